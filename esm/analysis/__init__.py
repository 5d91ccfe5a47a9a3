"""Paper section 3.1 checked where the true score is known (Gaussian mixtures under the VP process).

gmm.py: the data family and its closed-form marginal score, conditional score and noise posterior.
score_models.py: small one-stream (DSM) and two-stream (ESM) MLPs trained with esm/losses.py.
study.py: ESM_l / DSM_l measurements and the markdown table; plot.py: the figure (matplotlib).
The one command is bench/score_analysis.py.
"""
