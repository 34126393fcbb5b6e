"""Why GradTune and DFR stay at ERM's level on `biased_mnist`: linear probes on the ERM model's penultimate features
(the 256 features whose last layer DFR and GradTune retrain), logistic regression like DFR's head.

    python scripts/train.py --method erm --dataset biased_mnist --dataset_path <mnist> --output_dir runs/erm_mnist
    python scripts/probe_mnist_features.py runs/erm_mnist <mnist>

  A. fit on half of test_original (every digit, no square), scored on the other half: is the class (0-4 vs 5-9)
     linearly in the representation at all?
  B. oracle DFR: fit on the biased validation split re-balanced by GROUP (its minority groups hold 4s and 5s
     only, as the authors' protocol makes them) -> test_biased: what group labels buy a last layer with this data.
  C. fit on half of test_original plus the same digits with the square (the square independent of the class)
     -> test_biased on the other half: what a last layer reaches with held-out data of every digit.
A diagnostic for the README ("MaskTune on real MNIST"), not a benchmark: nothing is written.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from hf_robust import load_benchmark
from hf_robust.models.adapter import get_adapter
from hf_robust.models import load_model

run, data_path = Path(sys.argv[1]), sys.argv[2]
data = load_benchmark("biased_mnist", path=data_path)
model, processor = load_model(str(run), num_labels=2)
model.eval()
adapter = get_adapter(model)


def features(split, images=None):
    images = images if images is not None else split["image"]
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            batch = processor(images=images[i:i + 1000], return_tensors="pt")
            h, _ = adapter.penultimate({"pixel_values": batch["pixel_values"]})
            out.append(h.flatten(1))
    return torch.cat(out).numpy()


def worst_group(pred, label, group):
    return min((pred[group == g] == label[group == g]).mean() for g in np.unique(group))


rng = np.random.default_rng(0)
orig, biased, val = data["test_original"], data["test_biased"], data["validation"]
f_orig, y_orig = features(orig), np.asarray(orig["label"])
f_bias, y_bias, g_bias = features(biased), np.asarray(biased["label"]), np.asarray(biased["group"])
half = rng.permutation(len(orig)) < len(orig) // 2
probe = LogisticRegression(max_iter=2000, C=1.0).fit(f_orig[half], y_orig[half])

print(f"A. probe fit on half of test_original: acc on the other half {probe.score(f_orig[~half], y_orig[~half]):.4f}; "
      f"on test_biased (other half) acc {probe.score(f_bias[~half], y_bias[~half]):.4f}, worst group "
      f"{worst_group(probe.predict(f_bias[~half]), y_bias[~half], g_bias[~half]):.4f}")
f_val, y_val, g_val = features(val), np.asarray(val["label"]), np.asarray(val["group"])
counts = np.bincount(g_val)
n = counts[counts > 0].min()
scores = []
for r in range(10):
    idx = np.concatenate([rng.choice(np.flatnonzero(g_val == g), n, replace=False) for g in np.unique(g_val)])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(f_val[idx], y_val[idx])
    scores.append(clf.predict_proba(f_bias)[:, 1])
pred = (np.mean(scores, 0) > 0.5).astype(int)
print(f"B. oracle group-balanced DFR on validation (groups {counts.tolist()}, {n} per group; minority digits "
      f"{sorted(set(np.asarray(val['digit'])[(g_val == 0) | (g_val == 3)].tolist()))}): test_biased acc "
      f"{(pred == y_bias).mean():.4f}, worst group {worst_group(pred, y_bias, g_bias):.4f}")
# C: the same test_original half with and without the square: every digit in every group
idx = np.flatnonzero(half)
squared = [np.array(im.convert("RGB")) for im in orig.select(idx)["image"]]
for a in squared:
    a[:4, :4] = (255, 0, 0)  # the authors' square: top-left, 4x4, red
f_sq = features(None, [Image.fromarray(a) for a in squared])
clf = LogisticRegression(max_iter=2000, C=1.0).fit(np.concatenate([f_orig[half], f_sq]),
                                                   np.concatenate([y_orig[half], y_orig[half]]))
pred = clf.predict(f_bias[~half])
print(f"C. probe fit on half of test_original with and without the square: test_biased (other half) acc "
      f"{(pred == y_bias[~half]).mean():.4f}, worst group {worst_group(pred, y_bias[~half], g_bias[~half]):.4f}")
