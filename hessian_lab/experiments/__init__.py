"""Layer 6: the paper's experiments — models, data sets, training loop, checkpoints, sweeps, CLI.

Import submodules directly (``from hessian_lab.experiments.models import build_model``); this
package file stays light so that importing the models does not pull in the training machinery.
"""
