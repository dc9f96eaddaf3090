"""The command-line entry points end to end, as a user runs them."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TOL, data_root, random_torchvision_model, rel_err, within
from tl_jax import cli, commands

REPO = Path(__file__).resolve().parents[1]


def run_script(name, *args, check=True, timeout=600, folder='scripts'):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'}
  proc = subprocess.run([sys.executable, str(REPO / folder / name), *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
  return proc


def sample_images():
  """A few real hymenoptera images when present, else generated JPEGs."""
  root = data_root() / 'val'
  if root.is_dir():
    return sorted(root.glob('*/*.jpg'))[::40][:4]
  out = Path(os.environ.get('TMPDIR', '/tmp')) / 'tl_jax_sample_images'
  out.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate([(300, 200), (180, 260), (256, 256), (97, 403)]):
    path = out / f'img{i}.jpg'
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def make_folder(root: Path, per_class: int = 4, val_per_class: int = 2, size=(96, 80)) -> Path:
  rng = np.random.default_rng(1)
  for split, n in (('train', per_class), ('val', val_per_class)):
    for label, cls in enumerate(('ants', 'bees')):
      folder = root / split / cls
      folder.mkdir(parents=True)
      for i in range(n):
        base = np.full(size[::-1] + (3,), 60 + 120 * label, np.uint8)
        noise = rng.integers(0, 60, base.shape, dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / f'{cls}_{i}.jpg')
  return root


@pytest.mark.slow
def test_convert_predict_and_back_match_torchvision(tmp_path, capsys):
  """`tl-jax convert` and `tl-jax predict` in this process (the scripts are shims over them)."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  tmodel = random_torchvision_model('resnet18', 3).eval()
  src = tmp_path / 'resnet18.pth'
  torch.save(tmodel.state_dict(), src)

  assert run_main('convert', '--from-torch', src, '--out', tmp_path / 'ckpt', '--class-names', 'a,b,c',
                  capsys=capsys)[0] == 0
  images = sample_images()
  code, out, _ = run_main('predict', '--checkpoint', tmp_path / 'ckpt', '--json', *images, capsys=capsys)
  assert code == 0
  results = json.loads(out)

  import torchvision.transforms as T
  tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                  T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  with torch.no_grad():
    ref = tmodel(torch.stack([tf(Image.open(p).convert('RGB')) for p in images])).numpy()
  assert [r['path'] for r in results] == [str(p) for p in images]
  err = rel_err(np.array([r['logits'] for r in results]), ref)
  assert within(err, 'logits_rel', 'predict.py --json logits vs torchvision (rel)'), err
  for r, row in zip(results, ref):
    assert r['class_index'] == int(np.argmax(row))
    assert r['class_name'] == 'abc'[r['class_index']]
    np.testing.assert_allclose(sum(r['probs']), 1.0, rtol=1e-5)

  assert run_main('convert', '--to-torch', tmp_path / 'ckpt', '--out', tmp_path / 'back.pth', capsys=capsys)[0] == 0
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  fresh = torchvision.models.resnet18(num_classes=3)
  fresh.load_state_dict(back, strict=True)
  for name, tensor in tmodel.state_dict().items():
    if not name.endswith('num_batches_tracked'):
      assert torch.equal(back[name], tensor), name


@pytest.mark.slow
def test_predict_reports_unreadable_image_and_still_predicts_the_rest(tmp_path):
  torch = pytest.importorskip('torch')
  src = tmp_path / 'w.pth'
  torch.save(random_torchvision_model('resnet18', 2).state_dict(), src)
  run_script('convert_weights.py', '--from-torch', src, '--out', tmp_path / 'ckpt')
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not a jpeg at all')
  good = sample_images()[0]
  proc = run_script('predict.py', '--checkpoint', tmp_path / 'ckpt', '--json', good, bad, check=False)
  assert proc.returncode != 0
  results = json.loads(proc.stdout)
  assert results[0]['class_index'] in (0, 1) and 'error' not in results[0]
  assert 'broken.jpg' in results[1]['error']
  assert 'broken.jpg' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_convert_rejects_wrong_arch_and_non_state_dict(tmp_path):
  torch = pytest.importorskip('torch')
  src = tmp_path / 'r34.pth'
  torch.save(random_torchvision_model('resnet34', 2).state_dict(), src)
  proc = run_script('convert_weights.py', '--from-torch', src, '--out', tmp_path / 'x', '--arch', 'resnet18',
                    check=False)
  assert proc.returncode == 2 and 'resnet34' in proc.stderr and 'Traceback' not in proc.stderr
  junk = tmp_path / 'junk.pth'
  torch.save([1, 2, 3], junk)
  proc = run_script('convert_weights.py', '--from-torch', junk, '--out', tmp_path / 'y', check=False)
  assert proc.returncode == 2 and 'junk.pth' in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'x').exists() and not (tmp_path / 'y').exists()


@pytest.mark.slow
def test_train_writes_artifacts_and_predict_loads_the_best_checkpoint(tmp_path):
  data = make_folder(tmp_path / 'data')
  workdir = tmp_path / 'run'
  proc = run_script('train.py', '--strategy', 'frozen', '--data', data, '--weights', 'random', '--epochs', '2',
                    '--workdir', workdir, '--no-progress')
  assert 'Epoch 1/1' in proc.stdout and 'Best val Acc' in proc.stdout
  for name in ('history.json', 'train_batch.png', 'predictions.png', 'curves.png', 'evaluation.json', 'confusion.png'):
    assert (workdir / name).is_file(), name
  history = json.loads((workdir / 'history.json').read_text())
  assert [row['epoch'] for row in history['epochs']] == [0, 1]
  assert history['epochs'][1]['lr'] == pytest.approx(0.001)
  best = max(row['val_acc'] for row in history['epochs'])
  assert history['best_val_acc'] == best
  # The end-of-training evaluation scores the best checkpoint: its accuracy is the best epoch's.
  evaluation = json.loads((workdir / 'evaluation.json').read_text())
  assert evaluation['accuracy'] == pytest.approx(best)
  assert np.sum(evaluation['confusion_matrix']) == 4

  images = sorted((data / 'val').glob('*/*.jpg'))
  out = json.loads(run_script('predict.py', '--checkpoint', workdir, '--json', *images).stdout)
  assert {r['class_name'] for r in out} <= {'ants', 'bees'}
  # The restored best model reproduces the best epoch's val accuracy.
  labels = ['ants' if 'ants' in r['path'] else 'bees' for r in out]
  acc = np.mean([r['class_name'] == l for r, l in zip(out, labels)])
  assert acc == pytest.approx(best)


def run_main(command, *args, capsys):
  """`tl-jax COMMAND ARGS` in this process: (exit status, stdout, stderr)."""
  module = importlib.import_module(f'tl_jax.commands.{command}')
  with pytest.raises(SystemExit) as info:
    cli.run(lambda: module.main([str(a) for a in args], prog=f'tl-jax {command}'))
  captured = capsys.readouterr()
  return info.value.code, captured.out, captured.err


@pytest.mark.slow
def test_train_refuses_bad_flags_and_missing_data(tmp_path, capsys):
  def train(*args):
    code, _, err = run_main('train', *args, capsys=capsys)
    assert 'Traceback' not in err
    return code, err

  code, err = train('--strategy', 'frozen', '--data', tmp_path / 'nope', '--weights', 'random',
                    '--workdir', tmp_path / 'w')
  assert code == 2 and 'nope' in err
  code, err = train('--strategy', 'frozen', '--epochs', '0', '--workdir', tmp_path / 'w')
  assert code == 2 and 'epochs' in err
  data = make_folder(tmp_path / 'data')
  (data / 'val' / 'wasps').mkdir()
  Image.new('RGB', (50, 50)).save(data / 'val' / 'wasps' / 'w.jpg')
  code, err = train('--data', data, '--weights', 'random', '--workdir', tmp_path / 'w')
  assert code == 2 and 'wasps' in err
  (tmp_path / 'a_file').write_text('')
  for workdir, reason in ((tmp_path / 'a_file', 'is a file'), (tmp_path / 'a_file' / 'run', 'Not a directory')):
    code, err = train('--data', data, '--weights', 'random', '--workdir', workdir)
    assert code == 2 and reason in err, err
  config = tmp_path / 'c.yaml'
  config.write_text('stages: [{name: s, epochs: many}]\n')
  code, err = train('--config', config)
  assert code == 2 and 'stages[0].epochs in' in err and "'many'" in err
  code, err = train('--strategy', 'frozen', '--trainable', 'layer9')
  assert code == 2 and "no stage 'layer9'" in err and 'layer4' in err
  code, err = train('--strategy', 'two-stage', '--head-epochs', '5', '--epochs', '5')
  assert code == 2 and '--head-epochs 5, --epochs 5' in err
  code, err = train('--strategy', 'sometimes')
  assert code == 2 and "tl-jax train: error: argument --strategy: invalid choice: 'sometimes'" in err


def test_the_tl_jax_command_dispatches_to_each_command(capsys):
  for argv, status in (([], 2), (['--help'], 0), (['bogus'], 2)):
    with pytest.raises(SystemExit) as info:
      commands.main(argv)
    assert info.value.code == status
  assert "unknown command 'bogus'" in capsys.readouterr().err
  for command in commands.COMMANDS:
    with pytest.raises(SystemExit) as info:
      commands.main([command, '--help'])
    assert info.value.code == 0
    assert f'usage: tl-jax {command}' in capsys.readouterr().out


def test_scripts_are_shims_over_the_commands():
  # One subprocess: the checkout's script path reaches the same parser as `tl-jax train`.
  proc = run_script('train.py', '--strategy', 'sometimes', check=False)
  assert proc.returncode == 2 and "invalid choice: 'sometimes'" in proc.stderr


TWO_STAGE = """
model: {arch: resnet18, weights: random}
data:
  batch_size: 4
  workers: 1
  train_transforms: [{RandomResizedCrop: {size: 64}}, {RandomHorizontalFlip: {}}, {ToTensor: {}},
                     {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}]
  val_transforms: [{Resize: {size: 72}}, {CenterCrop: {size: 64}}, {ToTensor: {}},
                   {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}]
stages:
  - {name: head, epochs: 1, trainable: [head], optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
  - name: finetune
    epochs: 3
    trainable: all
    optimizer: {name: adam, lr: 0.0001, weight_decay: 0.01}
    schedule: {name: step, step_size: 1, gamma: 0.5}
"""


@pytest.mark.slow
def test_resume_after_a_kill_in_the_second_stage_gives_the_uninterrupted_run(tmp_path):
  """A real process killed with SIGKILL in stage 2, resumed: same metrics as a run never stopped.

  Stage 2 uses Adam, whose moments must come back from the checkpoint for the metrics to agree.
  """
  data = make_folder(tmp_path / 'data', per_class=8)
  recipe = tmp_path / 'two.yaml'
  recipe.write_text(TWO_STAGE)
  common = ['--config', recipe, '--data', data, '--no-progress']
  run_script('train.py', *common, '--workdir', tmp_path / 'straight')

  env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'}
  killed = tmp_path / 'killed'
  proc = subprocess.Popen([sys.executable, str(REPO / 'scripts' / 'train.py'), *map(str, common),
                           '--workdir', str(killed)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def finished_epochs():
    try:
      return json.loads((killed / 'history.json').read_text())['epochs']
    except (FileNotFoundError, json.JSONDecodeError):
      return []

  deadline = time.time() + 400
  while len(finished_epochs()) < 2:   # epoch 0 is the head stage, epoch 1 the first of stage 2
    assert proc.poll() is None, 'run ended before stage 2 began'
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = finished_epochs()
  assert 2 <= len(finished) < 4 and finished[-1]['stage'] == 'finetune'

  # Starting over in the same workdir would overwrite the run: refused.
  again = run_script('train.py', *common, '--workdir', killed, check=False)
  assert again.returncode == 2 and 'already holds a run' in again.stderr
  # A changed recipe is refused, naming what changed.
  changed = run_script('train.py', *common, '--workdir', killed, '--resume', '--lr', '0.5', check=False)
  assert changed.returncode == 2 and 'stages[1].optimizer.lr: run has 0.0001, now 0.5' in changed.stderr
  out = run_script('train.py', *common, '--workdir', killed, '--resume').stdout
  assert f'resuming {killed} after epoch' in out

  resumed = json.loads((killed / 'history.json').read_text())['epochs']
  straight = json.loads((tmp_path / 'straight' / 'history.json').read_text())['epochs']
  assert [(r['epoch'], r['stage']) for r in resumed] == [(0, 'head'), (1, 'finetune'), (2, 'finetune'),
                                                         (3, 'finetune')]
  for a, b in zip(resumed, straight):
    for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr'):
      assert a[key] == pytest.approx(b[key], rel=1e-5), (a['epoch'], key)


@pytest.mark.slow
def test_unreadable_training_image_stops_the_run_unless_skipped(tmp_path):
  data = make_folder(tmp_path / 'data')
  good = (data / 'train' / 'ants' / 'ants_0.jpg').read_bytes()
  bad = data / 'train' / 'ants' / 'truncated.jpg'
  bad.write_bytes(good[:len(good) // 2])
  common = ['--strategy', 'frozen', '--data', data, '--weights', 'random', '--epochs', '1', '--no-progress']
  proc = run_script('train.py', *common, '--workdir', tmp_path / 'a', check=False)
  assert proc.returncode == 2 and 'truncated.jpg' in proc.stderr and '--skip-bad-images' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = run_script('train.py', *common, '--workdir', tmp_path / 'b', '--skip-bad-images')
  assert 'truncated.jpg' in proc.stdout + proc.stderr
  assert 'skipped 1 unreadable image' in proc.stdout


def test_archs_lists_every_arch_and_the_readme_holds_its_table(capsys):
  """`tl-jax archs --markdown` has a row per registered arch, and the README's architecture table
  is that output (regenerate it with `python scripts/list_archs.py --markdown`)."""
  from tl_jax.models import ARCHS
  code, out, err = run_main('archs', '--markdown', capsys=capsys)
  assert code == 0 and not err
  rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith('| arch ')]
  assert [row.split(' | ')[0][2:] for row in rows] == list(ARCHS)
  readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
  assert out.strip() in readme, 'README.md: paste `python scripts/list_archs.py --markdown` into the arch table'
  code, out, _ = run_main('archs', '--arch', 'resnet50', capsys=capsys)
  assert code == 0 and 'IMAGENET1K_V2: resnet50-11ad3fa6.pth, Resize(232, bilinear)' in out
