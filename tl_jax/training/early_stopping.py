"""Early stopping of a stage, as Keras's `EarlyStopping(monitor, patience, min_delta)` does for a fit.

Each stage with `early_stopping` is one Keras fit: after each of its epochs the monitored value
(`val_loss`, lower is better, or `val_acc`, higher is better) is an improvement when it beats the
best so far by more than `min_delta` (Keras's `monitor_op(current - min_delta, best)`, with
`min_delta` negated for a loss); an improvement resets the count of epochs without one, and the
stage stops once that count reaches `patience` (never after the stage's first epoch, as Keras's
`epoch > 0`). The run then goes on with the next stage. The record is plain JSON, kept in the run
checkpoints' meta, so a resumed run counts on from where it was.
"""

from __future__ import annotations

from typing import Any, Optional


def new_record(config: Any) -> dict:
  """A stage's record before its first epoch (Keras's on_train_begin)."""
  # best None: nothing seen yet (Keras 3's reference None), which JSON writes as it is, unlike inf.
  return {'monitor': config.monitor, 'best': None, 'best_epoch': None, 'wait': 0, 'stopped_epoch': None}


def improves(config: Any, current: float, best: Optional[float]) -> bool:
  """Keras's `_is_improvement`: better than `best` by more than min_delta; anything improves on
  nothing (even a NaN, which nothing then improves on: Keras's comparisons)."""
  if best is None:
    return True
  if config.monitor == 'val_loss':
    return current + config.min_delta < best
  return current - config.min_delta > best


def update(config: Any, record: Optional[dict], row: dict) -> dict:
  """The record after the epoch of history row `row` (its 'stage_epoch' counts from the stage's start).

  Returns a new record; 'stopped_epoch' is the global epoch after which the stage stops, or None."""
  record = dict(record) if record is not None else new_record(config)
  current = float(row[config.monitor])
  record['wait'] += 1
  if improves(config, current, record['best']):
    record.update(best=current, best_epoch=row['epoch'], wait=0)
  elif record['wait'] >= config.patience and row['stage_epoch'] > 0:
    record['stopped_epoch'] = row['epoch']
  return record


def stop_message(stage_name: str, config: Any, record: dict) -> str:
  """The log line of a stage that stopped early: when and why."""
  best = ('nothing' if record['best_epoch'] is None
          else f"its best, {record['best']:.4f} (epoch {record['best_epoch']})")
  return (f"stage {stage_name}: stopped early after epoch {record['stopped_epoch']}: {config.monitor} did not "
          f"improve on {best} by more than min_delta {config.min_delta:g} for {record['wait']} epochs "
          f"(patience {config.patience})")


def after_epoch(records: dict, stage_config: Any, row: dict, log) -> bool:
  """Counts the epoch of `row` for its stage's `early_stopping` (if any): updates `records` (stage name
  -> record), notes the record in the row, logs a stop; whether the stage stops here."""
  config = stage_config.early_stopping
  if config is None:
    return False
  record = update(config, records.get(row['stage']), row)
  records[row['stage']] = record
  row['early_stopping'] = dict(record)
  if record['stopped_epoch'] is not None:
    log(stop_message(row['stage'], config, record))
  return record['stopped_epoch'] is not None


def stopped(records: dict, stage_name: str) -> bool:
  """Whether stage `stage_name` stopped early."""
  return (records.get(stage_name) or {}).get('stopped_epoch') is not None
