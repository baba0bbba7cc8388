"""Deterministic autoencoders against a VAE with the same latent dimension.

Trains five autoencoders from :mod:`pyrovae.baselines` (linear, deep, sparse, denoising,
contractive; plain PyTorch) and a VAE (Pyro, amortized VI) on the same binary images, then
writes to the output directory:

* ``reconstructions``: the same held-out images reconstructed by every model
  (the VAE through its posterior mean, E[x | z = mu(x)]);
* ``generation``: decoded random codes: for each autoencoder, z ~ N(m, C) with m and C the
  mean and covariance of its training codes (an autoencoder has no prior of its own); for the
  VAE, z ~ p(z) = N(0, I);
* ``latents``: the codes (posterior means for the VAE) of held-out images, side by side,
  coloured by digit (first two principal components when the latent dimension exceeds 2);
* ``results.md`` / ``results.json``: held-out reconstruction error, denoising error,
  encoder-Jacobian norms, code statistics, and the accuracy of a logistic-regression
  classifier on the codes against PCA features of the same dimension and raw pixels.

Data: every model sees the same images, statically binarized at 0.5 (the digits' grey levels
/ 16; binarized MNIST is binary already). The classifier is fitted on the training split's
codes and scored on the test split when the training split has labels (digits); otherwise
(binarized MNIST, whose labels cover only the test split) it is fitted on one half of the test
split and scored on the other.

Run from a plain checkout (defaults: the 8x8 digits, under 2 minutes on 2 CPU cores)::

    python experiments/autoencoders_vs_vae.py --out runs/autoencoders_vs_vae
    PYROVAE_DATA_DIR=../shared/data python experiments/autoencoders_vs_vae.py \\
        --dataset binarized-mnist --ae-epochs 10 --vae-epochs 20 --max-train 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from scipy.linalg import subspace_angles  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from pyrovae import VAE  # noqa: E402
from pyrovae.baselines import (  # noqa: E402
    ContractiveAutoencoder,
    DeepAutoencoder,
    DenoisingAutoencoder,
    LinearAutoencoder,
    SparseAutoencoder,
    corrupt,
    jacobian_frobenius,
)
from pyrovae.data import load_dataset, threshold  # noqa: E402
from pyrovae.latent_space import posterior_means  # noqa: E402
from pyrovae.plots import (  # noqa: E402
    image_rows_figure,
    latent_comparison_figure,
    save_figure,
)

NOISE = 0.3
"""Masking-noise level: training the denoising autoencoder and scoring every model."""


FULL_BATCH_LIMIT = 2000
"""Up to this many training images the linear autoencoder takes 1500 full-batch Adam steps,
which reach the PCA optimum to ~1e-3 rad; above it, the minibatch budget of the others."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "binarized-mnist"), default="digits")
    parser.add_argument("--data-dir", default=None, help="default: $PYROVAE_DATA_DIR")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layer")
    parser.add_argument("--ae-epochs", type=int, default=60)
    parser.add_argument("--vae-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=None, help="use the first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny networks)")
    parser.add_argument("--out", type=Path, default=Path("runs/autoencoders_vs_vae"))
    parser.add_argument("--figures-dir", type=Path, default=None, help="default: --out")
    parser.add_argument("--prefix", default="", help="prefix of the figure file names")
    parser.add_argument("--formats", nargs="+", choices=("png", "pdf"), default=["png", "pdf"])
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG files")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data


def load(args):
    """Binary train/test images, the image shape, and the classifier's train/test split."""
    dataset = load_dataset(args.dataset, args.data_dir)
    train = threshold(dataset.train[: args.max_train])
    test = threshold(dataset.test)
    if dataset.train_labels is not None:
        labels = dataset.train_labels[: args.max_train].numpy()
        split = {"train": (train, labels), "test": (test, dataset.test_labels.numpy())}
        where = "fitted on the training split, scored on the test split"
    else:
        order = np.random.default_rng(args.seed).permutation(len(test))
        half, labels = len(test) // 2, dataset.test_labels.numpy()
        first, second = order[:half], order[half:]
        split = {"train": (test[first], labels[first]), "test": (test[second], labels[second])}
        where = "fitted on a random half of the test split, scored on the other half"
    return train, test, dataset.test_labels.numpy(), dataset.image_shape, split, where


# ----------------------------------------------------------------------------- models


def autoencoders(args) -> dict:
    shared = {"latent_dim": args.latent_dim, "hidden_sizes": (args.hidden,), "activation": "tanh"}
    return {
        "linear AE": LinearAutoencoder(args.latent_dim),
        "deep AE": DeepAutoencoder(**shared),
        "sparse AE": SparseAutoencoder(**shared, sparsity=0.1),
        "denoising AE": DenoisingAutoencoder(**shared, noise=NOISE, noise_type="masking"),
        "contractive AE": ContractiveAutoencoder(**shared, contraction=0.1),
    }


def fit_all(args, train: torch.Tensor) -> tuple[dict, dict]:
    """Fitted models by name and their training times in seconds."""
    models, seconds = autoencoders(args), {}
    for name, model in models.items():
        started = time.perf_counter()
        budget = {"epochs": args.ae_epochs, "batch_size": args.batch_size, "lr": 3e-3}
        if name == "linear AE" and len(train) <= FULL_BATCH_LIMIT:
            budget = {"epochs": 1500, "batch_size": None, "lr": 3e-2}
        model.fit(train, **budget, seed=args.seed)
        seconds[name] = time.perf_counter() - started
        print(f"fitted {name} in {seconds[name]:.1f} s")
    started = time.perf_counter()
    pyro.set_rng_seed(args.seed)  # VAE() initialises its weights from the global RNG
    vae = VAE(
        num_features=train.shape[1],
        latent_dim=args.latent_dim,
        hidden_sizes=(args.hidden,),
        activation="tanh",
        likelihood="bernoulli",
    )
    vae.fit(train, epochs=args.vae_epochs, batch_size=args.batch_size, seed=args.seed,
            progress=False)  # fmt: skip
    models["VAE"], seconds["VAE"] = vae, time.perf_counter() - started
    print(f"fitted VAE in {seconds['VAE']:.1f} s")
    return models, seconds


# ----------------------------------------------------------------------------- measures


def encoder_function(model):
    """x -> codes, differentiable (for the Jacobian): a VAE's posterior mean, else f."""
    if isinstance(model, VAE):
        return lambda x: model.guide.encoder(x)[0]
    return model


def measures(name: str, model, train, test, corrupted) -> dict:
    codes = posterior_means(model, test)
    reconstruction = model.reconstruct(test)
    jacobian = jacobian_frobenius(encoder_function(model), test)
    spread = float(codes.var(0).sum().sqrt())  # RMS distance of the codes from their mean
    row = {
        "model": name,
        "reconstruction": float((reconstruction - test).pow(2).sum(1).mean()),
        "denoising": float((model.reconstruct(corrupted) - test).pow(2).sum(1).mean()),
        "jacobian": float(jacobian.mean()),
        "jacobian_per_spread": float(jacobian.mean()) / spread,
        "mean_abs_code": float(codes.abs().mean()),
        "zero_codes": float((codes == 0).float().mean()),
    }
    if isinstance(model, VAE):
        row["test_elbo"] = float(model.elbo(test, num_samples=10, analytic_kl=True, seed=0).mean())
    return row


def classifier_accuracy(train_features, train_labels, test_features, test_labels) -> float:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    classifier.fit(_numpy(train_features), train_labels)
    return float(classifier.score(_numpy(test_features), test_labels))


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


def accuracies(models: dict, split: dict, latent_dim: int) -> dict:
    """Accuracy of the classifier on each model's codes, on PCA features, on raw pixels."""
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    scores = {
        name: classifier_accuracy(
            posterior_means(model, x_train), y_train, posterior_means(model, x_test), y_test
        )
        for name, model in models.items()
    }
    pca = PCA(n_components=latent_dim).fit(x_train.numpy())
    scores[f"PCA ({latent_dim} components)"] = classifier_accuracy(
        pca.transform(x_train.numpy()), y_train, pca.transform(x_test.numpy()), y_test
    )
    scores[f"raw pixels ({x_train.shape[1]})"] = classifier_accuracy(
        x_train, y_train, x_test, y_test
    )
    return scores


def pca_reference(train, test, latent_dim: int, linear) -> dict:
    """PCA's held-out reconstruction error and its principal angles to the linear AE."""
    pca = PCA(n_components=latent_dim).fit(train.numpy())
    projected = pca.inverse_transform(pca.transform(test.numpy()))
    angles = subspace_angles(linear.components_.numpy(), pca.components_.T)
    full_batch = len(train) <= FULL_BATCH_LIMIT
    return {
        "linear_training": "1500 full-batch Adam steps"
        if full_batch
        else "the minibatch budget of the other autoencoders, which need not reach the "
        "PCA optimum (compare the reconstruction errors)",
        "reconstruction": float(((projected - test.numpy()) ** 2).sum(1).mean()),
        "max_principal_angle": float(angles.max()),
        "principal_angles": [float(a) for a in angles],
    }


# ----------------------------------------------------------------------------- figures


def generated_codes(model, train, num: int, seed: int) -> torch.Tensor:
    """Codes ~ N(mean, covariance) of the model's training codes."""
    codes = posterior_means(model, train).double().numpy()
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(codes.mean(0), np.cov(codes, rowvar=False), size=num)
    return torch.as_tensor(draws, dtype=torch.float32)


def figures(args, models, train, test, labels, shape) -> dict[str, list[Path]]:
    directory = args.figures_dir or args.out
    num = 12
    rows = {"data": test[:num]}
    rows.update({name: model.reconstruct(test[:num]) for name, model in models.items()})
    generation = {
        name: model.decode(generated_codes(model, train, num, args.seed))
        for name, model in models.items()
        if not isinstance(model, VAE)
    }
    generation["VAE (z ~ N(0, I))"] = models["VAE"].sample(num, seed=args.seed)[0]
    codes = {name: posterior_means(model, test) for name, model in models.items()}
    made = {
        "reconstructions": image_rows_figure(
            rows, shape, title="Held-out images and their reconstructions"
        ),
        "generation": image_rows_figure(
            generation,
            shape,
            title="Decoded random codes\nautoencoders: z ~ N(mean, covariance of the "
            "training codes); VAE: z ~ N(0, I)",
        ),
        "latents": latent_comparison_figure(
            codes, labels, title=f"Codes of held-out images ({args.latent_dim}-D latent)"
        ),
    }
    return {
        name: save_figure(
            figure, directory / f"{args.prefix}{name}", formats=args.formats, dpi=args.dpi
        )
        for name, figure in made.items()
    }


# ----------------------------------------------------------------------------- report


def markdown(rows: list[dict], scores: dict, pca: dict, args, where: str) -> str:
    lines = [
        f"Dataset `{args.dataset}` (binarized at 0.5), latent dimension {args.latent_dim}, "
        f"hidden width {args.hidden}, seed {args.seed}. Held-out (test split) averages; "
        "errors are squared errors summed over pixels, per image (lower is better).",
        "",
        "| model | reconstruction | denoising (30% masked) | ‖J‖_F | ‖J‖_F / code spread "
        "| mean \\|z\\| | zero codes | classifier accuracy | fit (s, 1 thread) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['reconstruction']:.2f} | {row['denoising']:.2f} "
            f"| {row['jacobian']:.2f} | {row['jacobian_per_spread']:.2f} "
            f"| {row['mean_abs_code']:.3f} | {row['zero_codes']:.0%} "
            f"| {scores[row['model']]:.1%} | {row['seconds']:.1f} |"
        )
    pca_name, raw_name = list(scores)[-2:]
    lines.append(
        f"| {pca_name} | {pca['reconstruction']:.2f} | | | | | | {scores[pca_name]:.1%} | |"
    )
    lines.append(f"| {raw_name} | | | | | | | {scores[raw_name]:.1%} | |")
    vae = next(row for row in rows if row["model"] == "VAE")
    angles = ", ".join(f"{angle:.2g}" for angle in pca["principal_angles"])
    lines += [
        "",
        f"* Classifier: standardized features, `LogisticRegression`; {where}.",
        "* Linear AE vs PCA: principal angles between the decoder's column space and the top "
        f"{args.latent_dim} principal components: {angles} rad "
        f"(max {pca['max_principal_angle']:.2g}); {pca['linear_training']}.",
        "* ‖J‖_F: Frobenius norm of the encoder Jacobian dz/dx (VAE: of the posterior mean), "
        "averaged over held-out images. It is not scale-invariant (a decoder can undo a "
        "shrunken code), so it is also divided by the code spread, the RMS distance of the "
        "codes from their mean.",
        f"* VAE test ELBO: {vae['test_elbo']:.2f} nats per image (10 draws, analytic KL).",
        *findings({row["model"]: row for row in rows}),
    ]
    return "\n".join(lines) + "\n"


def findings(by_name: dict) -> list[str]:
    """Comparisons between variants of one architecture and training budget."""
    deep, contractive = by_name["deep AE"], by_name["contractive AE"]
    denoising, sparse = by_name["denoising AE"], by_name["sparse AE"]
    return [
        "* Contractive vs deep AE (same architecture and budget): ‖J‖_F "
        f"{deep['jacobian']:.2f} → {contractive['jacobian']:.2f} "
        f"({deep['jacobian'] / contractive['jacobian']:.1f}x smaller); per code spread "
        f"{deep['jacobian_per_spread']:.2f} → {contractive['jacobian_per_spread']:.2f} "
        f"({deep['jacobian_per_spread'] / contractive['jacobian_per_spread']:.2f}x).",
        "* Denoising vs deep AE on 30%-masked held-out inputs (error against the clean "
        f"image): {denoising['denoising']:.2f} vs {deep['denoising']:.2f}.",
        "* Sparse AE (ReLU codes, L1 weight 0.1; the others have linear codes): mean |z| "
        f"{sparse['mean_abs_code']:.3f} vs {deep['mean_abs_code']:.3f} for the deep AE, "
        f"{sparse['zero_codes']:.0%} of its codes exactly zero.",
    ]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test, test_labels, shape, split, where = load(args)
    models, seconds = fit_all(args, train)
    corrupted = corrupt(test, NOISE, "masking", torch.Generator().manual_seed(args.seed))
    rows = [
        {**measures(name, model, train, test, corrupted), "seconds": seconds[name]}
        for name, model in models.items()
    ]
    scores = accuracies(models, split, args.latent_dim)
    pca = pca_reference(train, test, args.latent_dim, models["linear AE"])
    written = figures(args, models, train, test, test_labels, shape)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, scores, pca, args, where)
    (args.out / "results.md").write_text(table)
    results = {"rows": rows, "accuracy": scores, "pca": pca, "classifier_split": where}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    for paths in written.values():
        print("wrote " + ", ".join(str(path) for path in paths))
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return {**results, "figures": written, "table": table}


if __name__ == "__main__":
    run(parse_args())
