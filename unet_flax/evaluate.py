"""Whole-scene prediction and segmentation metrics: confusion matrix, pixel accuracy,
per-class IoU and F1, mean IoU and macro F1. Pixels with target IGNORE are never counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.windows import reflect_indices

if TYPE_CHECKING:
    from unet_flax.train_config import TrainWorkflow

PredictFn = Callable[[np.ndarray], np.ndarray]


def confusion_matrix(predicted: np.ndarray, targets: np.ndarray, num_classes: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``(C, C)`` counts, rows true class and columns predicted, over labelled pixels in ``mask``."""
    keep = targets >= 0 if mask is None else (targets >= 0) & mask
    index = targets[keep].astype(np.int64) * num_classes + predicted[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Pixel accuracy, mean IoU, macro F1 and per-class IoU/F1/precision/recall/support.

    Classes absent from both truth and prediction have IoU/F1 ``None`` and are left out of
    the means; the confusion matrix is included as nested lists.
    """
    cm = confusion.astype(np.float64)
    tp = np.diag(cm)
    truth, predicted = cm.sum(axis=1), cm.sum(axis=0)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        f1 = np.where(truth + predicted > 0, 2 * tp / (truth + predicted), np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
    total = cm.sum()

    def number(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 6)

    return {
        "pixels": int(total),
        "pixel_accuracy": number(tp.sum() / total) if total else None,
        "mean_iou": number(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "macro_f1": number(np.nanmean(f1)) if np.isfinite(f1).any() else None,
        "per_class": {
            name: {"iou": number(iou[i]), "f1": number(f1[i]), "precision": number(precision[i]),
                   "recall": number(recall[i]), "support": int(truth[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion.astype(int).tolist(),
    }


def pad_to_multiple(image: np.ndarray, factor: int) -> np.ndarray:
    """``(H, W, B)`` image padded at the bottom/right to multiples of ``factor`` by reflection:
    the context tiled inference reads beyond a raster's edge (:func:`pipeline.windows.reflect_indices`)."""
    h, w = image.shape[:2]
    rows, cols = reflect_indices(0, h + -h % factor, h), reflect_indices(0, w + -w % factor, w)
    return image[np.ix_(rows, cols)]


def predict_scene(predict: PredictFn, normalised: np.ndarray, factor: int) -> np.ndarray:
    """Class indexes ``(H, W)`` for a whole normalised ``(H, W, B)`` scene in one call."""
    h, w = normalised.shape[:2]
    padded = pad_to_multiple(normalised, factor)
    return np.asarray(predict(padded[None]))[0, :h, :w]


def checkpoint_predictor(model: Any) -> PredictFn:
    """A jitted whole-batch predictor for a loaded (eval-mode) model: split once, merged inside."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, x: jnp.argmax(nnx.merge(graphdef, st)(x), axis=-1).astype(jnp.int32))
    return lambda batch: np.asarray(run(state, batch))


def evaluate_checkpoint(checkpoint: str | Path, workflow: TrainWorkflow) -> dict[str, Any]:
    """Scores of ``checkpoint`` against every labelled pixel of the workflow's scenes,
    overall and per scene (training and hold-out pixels alike)."""
    from unet_flax.checkpoint import load_checkpoint
    from unet_flax.data import Stats, read_scenes

    loaded = load_checkpoint(checkpoint)
    card = loaded.card
    index_of = {code: i for i, code in enumerate(card.codes.tolist())}
    codes = [c.code for c in workflow.classes]
    if set(codes) != set(index_of):
        raise ValueError(f"{checkpoint}: classes {sorted(index_of)} differ from the workflow's {codes}")
    scenes, _ = read_scenes(workflow.data, card.codes.tolist(), [c.name for c in card.classes])
    stats = Stats(np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32))
    predict = checkpoint_predictor(loaded.model)
    names = [c.name for c in card.classes]
    total = np.zeros((len(names), len(names)), dtype=np.int64)
    per_scene = {}
    for scene in scenes:
        predicted = predict_scene(predict, stats.normalise(scene.image, scene.valid), card.unet.factor)
        cm = confusion_matrix(predicted, scene.targets, len(names))
        per_scene[scene.name] = scores(cm, names)
        total += cm
    return {"checkpoint": str(checkpoint), "sha256": loaded.sha256, "overall": scores(total, names), "scenes": per_scene}


def fold_workflows(workflow: TrainWorkflow) -> list[TrainWorkflow]:
    """One workflow per vertical strip held out, validated only once, after the last step
    (no checkpoint selection on the hold-out), each writing ``<stem>-fold<k>.safetensors``."""
    folds = []
    strips = workflow.validation.strips
    for fold in range(strips):
        validation = workflow.validation.model_copy(update={"mode": "strips", "fold": fold, "every": workflow.optimizer.steps})
        checkpoint = workflow.output.checkpoint
        output = workflow.output.model_copy(update={"checkpoint": checkpoint.with_name(f"{checkpoint.stem}-fold{fold}{checkpoint.suffix}")})
        folds.append(workflow.model_copy(update={"validation": validation, "output": output}))
    return folds


def random_forest_confusion(scenes: Sequence[Any], holdout: Sequence[np.ndarray], gap: int, num_classes: int,
                            trees: int = 300, seed: int = 0) -> np.ndarray:
    """Confusion of a per-pixel random forest (raw bands as features, NaN where a band has
    no data) trained outside the hold-out and scored on its labelled pixels."""
    from sklearn.ensemble import RandomForestClassifier

    from unet_flax.data import dilate

    train_x, train_y, test_x, test_y = [], [], [], []
    for scene, mask in zip(scenes, holdout):
        labelled = scene.targets >= 0
        train = labelled & ~dilate(mask, gap)
        train_x.append(scene.image[train])
        train_y.append(scene.targets[train])
        test_x.append(scene.image[labelled & mask])
        test_y.append(scene.targets[labelled & mask])
    forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=2)
    forest.fit(np.concatenate(train_x), np.concatenate(train_y))
    truth = np.concatenate(test_y)
    predicted = forest.predict(np.concatenate(test_x)) if len(truth) else truth
    return confusion_matrix(predicted, truth, num_classes)


def strip_benchmark(workflow: TrainWorkflow, *, trees: int = 300, progress: bool = False) -> dict[str, Any]:
    """U-Net vs random forest with each vertical strip held out in turn, on the same pixels.

    Returns per-fold and mean pixel accuracy and macro F1 of both models, with the full
    scores (per-class, confusion) of every fold.
    """
    from unet_flax.train import prepare, train

    names = [c.name for c in workflow.classes]
    folds = []
    for cfg in fold_workflows(workflow):
        prepared = prepare(cfg)
        result = train(cfg, progress=progress)
        forest = scores(random_forest_confusion(prepared.scenes, prepared.holdout, cfg.validation.gap, len(names),
                                                trees, cfg.seed), names)
        unet = {k: v for k, v in result.best.items() if k != "step"}
        assert unet["pixels"] == forest["pixels"], "both models must be scored on the same pixels"
        folds.append({"fold": cfg.validation.fold, "pixels": forest["pixels"], "train_pixels": int(prepared.counts.sum()),
                      "unet": unet, "random_forest": forest, "checkpoint": str(result.checkpoint)})
    summary = {
        model: {metric: float(np.mean([f[model][metric] for f in folds])) for metric in ("pixel_accuracy", "macro_f1", "mean_iou")}
        for model in ("unet", "random_forest")
    }
    return {"workflow": workflow.name, "strips": workflow.validation.strips, "trees": trees,
            "steps": workflow.optimizer.steps, "seed": workflow.seed, "mean": summary, "folds": folds}


def format_benchmark(result: dict[str, Any]) -> str:
    """The per-fold table of a :func:`strip_benchmark` result."""
    lines = [f"{'fold':>4} {'pixels':>7} | {'U-Net acc':>9} {'U-Net F1':>8} | {'RF acc':>7} {'RF F1':>6}"]
    for f in result["folds"]:
        u, r = f["unet"], f["random_forest"]
        lines.append(f"{f['fold']:>4} {f['pixels']:>7} | {u['pixel_accuracy']:>9.3f} {u['macro_f1']:>8.3f} | "
                     f"{r['pixel_accuracy']:>7.3f} {r['macro_f1']:>6.3f}")
    u, r = result["mean"]["unet"], result["mean"]["random_forest"]
    lines.append(f"{'mean':>4} {'':>7} | {u['pixel_accuracy']:>9.3f} {u['macro_f1']:>8.3f} | "
                 f"{r['pixel_accuracy']:>7.3f} {r['macro_f1']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m unet_flax.evaluate WORKFLOW.yaml [--checkpoint PATH | --strips [--json OUT]] [--set k=v ...]``."""
    import argparse
    import json

    from unet_flax.train_config import load_train_workflow

    parser = argparse.ArgumentParser(prog="python -m unet_flax.evaluate", description=main.__doc__)
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="defaults to the workflow's output.checkpoint")
    parser.add_argument("--strips", action="store_true", help="U-Net vs random forest, each vertical strip held out")
    parser.add_argument("--trees", type=int, default=300, help="random forest size (with --strips)")
    parser.add_argument("--json", type=Path, help="write the --strips result here (default: beside the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_train_workflow(args.workflow, args.overrides)
    if args.strips:
        result = strip_benchmark(cfg, trees=args.trees, progress=not args.no_progress)
        out = args.json or cfg.output.checkpoint.with_name(f"{cfg.output.checkpoint.stem}.strips.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(format_benchmark(result))
        print(f"written: {out}")
        return 0
    result = evaluate_checkpoint(args.checkpoint or cfg.output.checkpoint, cfg)
    for name, s in [("all", result["overall"]), *result["scenes"].items()]:
        print(f"{name:>10}  pixels {s['pixels']:>8}  accuracy {s['pixel_accuracy']:.4f}  mIoU {s['mean_iou']:.4f}  macro F1 {s['macro_f1']:.4f}")
    print(json.dumps({k: result["overall"][k] for k in ("pixels", "pixel_accuracy", "mean_iou", "macro_f1")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
