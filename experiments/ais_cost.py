"""Cost of annealed importance sampling: CPU seconds of one torch thread per image per 1000
annealing steps (16 estimating + 2 tuning chains, 10 leapfrog steps), for the models the
documentation uses. Untrained weights: the cost does not depend on the values. Run::

    OMP_NUM_THREADS=1 PYROVAE_DATA_DIR=../shared/data python experiments/ais_cost.py

CPU time (``time.process_time``) is reported beside wall time because on a shared machine the
wall time includes waiting for a core; on an idle core the two agree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import load_binarized_mnist, load_digits, threshold  # noqa: E402
from pyrovae.evaluation.ais import ais  # noqa: E402


def main(steps: int = 100) -> None:
    torch.set_num_threads(1)
    digits = threshold(load_digits().test)
    mnist = load_binarized_mnist().test.float()
    mlp = {"num_features": 784, "activation": "tanh"}
    burda = VAEConfig(**mlp, latent_dim=50, hidden_sizes=(200, 200))
    cases = (
        ("digits 64-128-8", VAEConfig(64, latent_dim=8, hidden_sizes=(128,)), digits[:20]),
        ("digits 64-256-256-8 (README)", VAEConfig(64, latent_dim=8), digits[:20]),
        ("MNIST 784-100-20 tanh", VAEConfig(**mlp, latent_dim=20, hidden_sizes=(100,)), mnist[:20]),
        ("MNIST 784-200-200-50 tanh", burda, mnist[:20]),
    )
    print(f"AIS, T = {steps}, 16 + 2 chains, 10 leapfrog steps, 20 images at once, "
          f"torch threads {torch.get_num_threads()}")
    for name, config, x in cases:
        vae = VAE(config, seed=0)
        cpu, wall = time.process_time(), time.perf_counter()
        ais(vae.model, vae.guide, vae.inputs(x)[0], num_steps=steps, num_chains=16, seed=0)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        scale = 1000 / steps / len(x)
        print(f"{name}: {cpu * scale:.1f} s CPU ({wall * scale:.1f} s wall) per image per "
              "1000 steps")


if __name__ == "__main__":
    main()
