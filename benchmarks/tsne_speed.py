"""Seconds and quality of the tsne stage's backend (openTSNE) against scikit-learn's TSNE on real
embeddings, both after the same PCA (`tsne.pca_dims`):

    python -m benchmarks.tsne_speed [--embeddings data/embeddings/mnist.npz] [--repeats 1]

Quality: the stage's 2-D linear-SVM accuracy and the 10-nearest-neighbour accuracy in 2-D
(5-fold), so a faster backend cannot win by producing a worse map.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from imgcls import params, paths
from imgcls.sources import stratified_subset
from imgcls.projection import REPRESENTATIONS, linear_separability, project


def sklearn_project(vectors: np.ndarray, cfg, seed: int) -> np.ndarray:
    """scikit-learn's Barnes-Hut TSNE after the stage's PCA step."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    vectors = vectors.astype(np.float32)
    if vectors.shape[1] > cfg.pca_dims:
        vectors = PCA(n_components=min(cfg.pca_dims, len(vectors)), random_state=seed).fit_transform(vectors)
    return TSNE(perplexity=cfg.perplexity, random_state=seed, n_jobs=-1).fit_transform(vectors)


def knn_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(10), points, labels, cv=5).mean())


BACKENDS = {"openTSNE (stage)": project, "scikit-learn": sklearn_project}


def run(embeddings: Path, repeats: int = 1, max_points: int | None = None) -> list[dict]:
    cfg = params.load().tsne
    with np.load(embeddings, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    keep = stratified_subset(arrays["labels"], max_points or cfg.max_points, cfg.seed)
    labels, rows = arrays["labels"][keep], []
    for key, _ in REPRESENTATIONS:
        vectors = arrays[key][keep]
        for backend, function in BACKENDS.items():
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                points = function(vectors, cfg, cfg.seed)
                seconds.append(time.perf_counter() - started)
            rows.append({"representation": f"{key} ({vectors.shape[1]}-d)", "points": len(keep), "backend": backend,
                         "seconds": statistics.median(seconds),
                         "svm_2d_acc": linear_separability(points, labels, cfg.seed)[0],
                         "knn_2d_acc": knn_accuracy(points, labels)})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tsne_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path, default=paths.embeddings("mnist"),
                        help=f"an embed stage output (default {paths.embeddings('mnist')})")
    parser.add_argument("--repeats", type=int, default=1, help="timings per figure (median reported)")
    parser.add_argument("--max-points", type=int, default=None, help="default: params tsne.max_points")
    args = parser.parse_args(argv)
    if not args.embeddings.exists():
        parser.error(f"{args.embeddings} not found: run `dvc repro embed@mnist` or pass --embeddings")
    rows = run(args.embeddings, args.repeats, args.max_points)
    print("| representation | points | backend | seconds | 2-D linear SVM acc | 2-D 10-NN acc |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['representation']} | {row['points']} | {row['backend']} | {row['seconds']:.1f} | "
              f"{row['svm_2d_acc']:.4f} | {row['knn_2d_acc']:.4f} |")
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs; load average (1, 5, 15 min) after: {load}")
    return rows


if __name__ == "__main__":
    main()
