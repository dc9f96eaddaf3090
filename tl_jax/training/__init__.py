"""Training: the state (`state.py`), pure steps (`steps.py`), a recipe's data pipeline
(`pipeline.py`), stages with their optimizers and compiled steps (`stages.py`), cached backbone
features (`features.py`), the run loop with its extension points (`loop.py`), what it does about
faults (`faults.py`: non-finite steps, signals, mid-epoch checkpoints) and the end of a run (`finish.py`)."""

from tl_jax.training.finish import TrainResult
from tl_jax.training.faults import NonFiniteError, Preempted
from tl_jax.training.loop import Callback, Run, run_epoch, run_phase, run_steps, train_and_evaluate
from tl_jax.training.state import TrainState, create_train_state, dropout_key, model_variables, state_tree
from tl_jax.training.steps import eval_step, features_step, train_step

__all__ = ['Callback', 'NonFiniteError', 'Preempted', 'Run', 'TrainResult', 'TrainState', 'create_train_state',
           'dropout_key', 'eval_step', 'features_step', 'model_variables', 'run_epoch', 'run_phase', 'run_steps',
           'state_tree', 'train_and_evaluate', 'train_step']
