"""The trainer's workdir lock and one-line errors for bad config files and overrides."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from esm import workdir
from esm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(path, pid):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, workdir.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': pid, 'since': 'earlier'}, f)


def test_a_live_holder_refuses_a_second_trainer_and_a_dead_one_is_taken_over(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    _write_lock(str(tmp_path), holder.pid)
    with pytest.raises(UserError, match=f'being trained by PID {holder.pid}'):
      with workdir.training_lock(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  with workdir.training_lock(str(tmp_path)):  # the holder is dead now: taken over
    with open(os.path.join(tmp_path, workdir.LOCK_FILE)) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert any('no longer running' in r.message for r in caplog.records)
  assert not os.path.exists(os.path.join(tmp_path, workdir.LOCK_FILE))


@pytest.mark.slow
def test_a_second_trainer_exits_at_once_with_one_line(tmp_path):
  _write_lock(str(tmp_path), os.getpid())  # this test process: alive
  start = time.time()
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py', '--mode=train',
                        f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and time.time() - start < 60
  assert out.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path} is being trained by')
  assert sorted(os.listdir(tmp_path)) == [workdir.LOCK_FILE]  # nothing written


@pytest.mark.parametrize('args, start', [
    (['--config.train.num_step=5'], 'error: --config.train.num_step: \'num_step\' Did you mean "num_steps"'),
    (['--config=configs/nonexistent.py'], 'error: '),
    (['--config.sampling.t_d=abc'], 'error: flag --config.sampling.t_d=abc'),
])
def test_bad_config_file_or_override_is_one_line_with_status_2(tmp_path, args, start):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                        f'--workdir={tmp_path / "w"}'] + args, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
  assert out.stderr.startswith(start) and 'Traceback' not in out.stderr
  assert not os.path.exists(tmp_path / 'w')
