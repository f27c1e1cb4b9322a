"""Projecting representations to 2-D (PCA, then t-SNE) and measuring how linearly separable
the projection is (a linear SVM on the 2-D points; its line for two-class studies).

openTSNE rather than scikit-learn: as good a map of this project's embeddings, and quicker on
a busy machine (docs/measurements.md#t-sne).
"""
import numpy as np

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
