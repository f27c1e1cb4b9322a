"""Stage tsne@<run>: 2-D t-SNE of the validation embeddings (intermediate and final),
coloured by class, with a linear SVM fitted on the 2-D points as a measure of how linearly
separable the projection is (the line is drawn for two-class studies, as in the seed's Fig. 8).

openTSNE rather than scikit-learn: on this project's real 10k-point embeddings they tie on an
idle 2-core machine, and openTSNE was ~2x faster on a busy one (docs/speed.md).  Wide
features are reduced with PCA first (`tsne.pca_dims`), the usual practice.
Reads params `tsne.*` and `seed`; writes plots/<run>/tsne.csv, tsne.png and metrics/tsne_<run>.json.
"""
import csv
import sys

import numpy as np

from stages import params, paths, plotting
from stages.errors import PipelineError, stage_main
from stages.files import atomic_path, load_npz, save_json
from stages.sources import stratified_subset

REPRESENTATIONS = (("features", "intermediate (conv features)"), ("logits", "final (logits)"))


def project(vectors: np.ndarray, cfg, seed: int) -> np.ndarray:
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    vectors = vectors.astype(np.float32)
    if vectors.shape[1] > cfg.pca_dims:
        vectors = PCA(n_components=min(cfg.pca_dims, len(vectors)), random_state=seed).fit_transform(vectors)
    return np.asarray(TSNE(perplexity=cfg.perplexity, random_state=seed, n_jobs=-1, verbose=False).fit(vectors))


def linear_separability(points: np.ndarray, labels: np.ndarray, seed: int):
    """Accuracy of a linear SVM on the 2-D points, and its line for two classes."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler = StandardScaler().fit(points)
    svm = LinearSVC(C=1.0, random_state=seed, max_iter=20000).fit(scaler.transform(points), labels)
    accuracy = float(svm.score(scaler.transform(points), labels))
    if len(svm.classes_) != 2:
        return accuracy, None
    weights, bias = svm.coef_[0] / scaler.scale_, svm.intercept_[0] - np.dot(svm.coef_[0], scaler.mean_ / scaler.scale_)
    return accuracy, clip_line(weights, bias, points)


def clip_line(weights, bias: float, points: np.ndarray):
    """The part of the line w.x + b = 0 inside the points' bounding box, as ((x0, x1), (y0, y1)),
    or None if it misses the box; a steep line would otherwise stretch the figure's axes."""
    low, high = points.min(axis=0), points.max(axis=0)
    tolerance = 1e-9 * float(np.max(high - low) or 1.0)
    candidates = []
    for axis in (0, 1):
        other = 1 - axis
        if abs(weights[other]) > 1e-12:  # where the line crosses the box's two sides across `axis`
            for value in (low[axis], high[axis]):
                point = np.empty(2)
                point[axis], point[other] = value, -(weights[axis] * value + bias) / weights[other]
                candidates.append(point)
    inside = sorted((tuple(p) for p in candidates if np.all(p >= low - tolerance) and np.all(p <= high + tolerance)))
    if len(inside) < 2:
        return None
    (x0, y0), (x1, y1) = inside[0], inside[-1]
    return np.array([x0, x1]), np.array([y0, y1])


@stage_main
def main(run: str) -> None:
    all_params = params.load()
    cfg = all_params.tsne
    embedded = load_npz(paths.embeddings(run), f"embeddings of {run}")
    classes = [str(c) for c in embedded["classes"]]
    keep = stratified_subset(embedded["labels"], cfg.max_points, cfg.seed)
    if cfg.perplexity * 3 >= len(keep):
        raise PipelineError(f"tsne.perplexity {cfg.perplexity} is too large for {len(keep)} points "
                            f"(needs perplexity < points / 3)")
    labels = embedded["labels"][keep]
    panels, summary, rows = [], {"points": int(len(keep))}, []
    for key, title in REPRESENTATIONS:
        points = project(embedded[key][keep], cfg, cfg.seed)
        accuracy, boundary = linear_separability(points, labels, cfg.seed)
        summary[f"svm_2d_acc_{key}"] = round(accuracy, 4)
        panels.append({"name": f"{title}, {embedded[key].shape[1]}-d", "points": points, "labels": labels,
                       "boundary": boundary, "note": f"2-D linear SVM {accuracy:.1%}"})
        rows += [(key, f"{x:.4f}", f"{y:.4f}", classes[label]) for (x, y), label in zip(points, labels)]
        print(f"tsne@{run}: {key} ({embedded[key].shape[1]}-d) -> 2-D, linear SVM on the projection {accuracy:.4f}")
    with atomic_path(paths.tsne_csv(run)) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["representation", "x", "y", "class"])
            writer.writerows(rows)
    plotting.tsne(panels, classes, f"t-SNE of {run} validation representations "
                  f"(perplexity {cfg.perplexity:g}, {len(keep)} points)", paths.tsne_png(run))
    save_json(paths.tsne_metrics(run), summary)


if __name__ == "__main__":
    main(sys.argv[1])
