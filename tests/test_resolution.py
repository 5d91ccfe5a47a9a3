"""experiments/resolution.py's job list: each operating point evaluates the same training run."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a process of its own: its absl flags share names with experiments/regret.py's.
JOBS = """
import json, sys
sys.path.insert(0, 'experiments')
from absl import flags
import resolution
flags.FLAGS(['resolution', '--workdir=' + sys.argv[1], '--root=/data'])
jobs = resolution.jobs_of('pill', '48', 'sgm', 4, {'train', 'eval'}, ['default', 'paper_t_d', 'tuned'])
for job in jobs:
  if job.prepare:
    job.prepare()
print(json.dumps([[j.name, j.args(), list(j.deps), j.prepare is not None] for j in jobs]))
"""


def test_each_point_is_evaluated_in_its_own_folder_from_a_copy_of_the_final_checkpoint(tmp_path):
  run = tmp_path / 'pill' / '48' / 'sgm_s4'
  checkpoint = run / 'checkpoints' / '1600'
  os.makedirs(checkpoint)
  (checkpoint / 'state').write_text('')
  out = subprocess.run([sys.executable, '-c', JOBS, str(tmp_path)], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  jobs = {name: (args, deps, prepared) for name, args, deps, prepared in json.loads(out)}
  assert list(jobs) == ['train pill/48/sgm/s4', 'eval pill/48/sgm/s4',
                        'eval pill/48/sgm/s4 paper_t_d', 'tune pill/48/sgm/s4',
                        'eval pill/48/sgm/s4 tuned']
  default, paper, tune, tuned = (jobs[n] for n in list(jobs)[1:])
  assert f'--workdir={run}' in default[0] and not any('sampling.t_d' in a for a in default[0])
  assert not default[2]  # the default point reads the training run itself
  assert f'--workdir={run / "points" / "paper_t_d"}' in paper[0]
  assert '--config.sampling.t_d=41' in paper[0]  # pill's 164 of 1000, scaled to T = 250
  assert '--mode=tune' in tune[0] and f'--workdir={run / "points" / "tuned"}' in tune[0]
  assert default[1] == paper[1] == tune[1] == [str(checkpoint)]
  assert tuned[1] == [str(run / 'points' / 'tuned' / 'tuned.json')]  # tuned, then evaluated
  # the model's sampler is the tuning's default, and tuned.json's choice is what evaluation reads
  assert '--config.sampling.method=sgm' in tune[0]
  assert not any(a.startswith('--config.sampling.') for a in tuned[0])
  for point in ('paper_t_d', 'tuned'):
    assert (run / 'points' / point / 'checkpoints' / '1600' / 'state').exists()
