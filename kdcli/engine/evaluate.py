"""``kdcli evaluate``: the metrics of a checkpoint on a dataset split, optionally against a teacher."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kdcli import methods, models
from kdcli.config import make_config
from kdcli.data import DEFAULT_MAX_BAD_FRACTION, DataBundle, open_data
from kdcli.data.corruption import check_class_order
from kdcli.engine import report as rep
from kdcli.engine.rundir import MODEL_FILE
from kdcli.engine.session import Session, data_facts, default_workers, make_accelerator, make_loader
from kdcli.errors import KdcliError
from kdcli.models import checkpoint as ckpt


def model_info(loaded: models.Loaded, path: Path | None = None) -> rep.ModelInfo:
    file = path or (Path(loaded.path) if loaded.path else None)
    return rep.ModelInfo(name=loaded.model.meta.architecture, source=loaded.source,
                         path=str(file) if file else None, params=loaded.model.num_params,
                         sha256=ckpt.sha256(file) if file else None, trained=loaded.trained,
                         adapted=list(loaded.adapted), class_order=loaded.class_order,
                         input_size=loaded.model.meta.input_size)


def data_info(data: DataBundle, corruption: dict | None = None, skipped: dict | None = None) -> rep.DataInfo:
    return rep.DataInfo(dataset=data.name, source=data.source, train_split=data.train_split,
                        eval_split=data.eval_split, num_classes=data.num_classes, class_names=data.class_names,
                        num_train=data.num_train, num_eval=data.num_eval, image_size=data.image_size,
                        in_chans=data.in_chans, streaming=data.streaming, corruption=corruption,
                        augment=data.augment, interpolation=data.interpolation, crop_pct=data.crop_pct,
                        skipped={k: v for k, v in (skipped or {}).items() if v is not None} or None)


def evaluate_checkpoint(checkpoint: str, dataset: str, *, split: str | None = None,
                        teacher: str | list[str] | None = None,
                        teacher_weights: str | list[str | None] | None = None, batch_size: int = 128,
                        image_column: str | None = None,
                        label_column: str | None = None, precision: str = "fp32",
                        workers: int | None = None, noise: str | None = None, imbalance: str | None = None,
                        corruption_seed: int = 0, class_order: str | None = None,
                        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                        ignore_class_names: bool = False) -> rep.EvalReport:
    """Metrics of a kdcli checkpoint on a dataset split, optionally against a teacher (or an ensemble: several,
    compared through their mean probability). The split is used as it is, unless ``noise``/``imbalance`` ask for
    it to be corrupted (then the report says how)."""
    path = Path(checkpoint).expanduser()
    # the options a run shares, checked before anything is loaded (one line naming the option)
    cfg = make_config(command="train", student=str(path), dataset=dataset, out=".", batch_size=batch_size,
                      precision=precision, workers=workers, max_bad_fraction=max_bad_fraction)
    if path.is_dir() and (path / MODEL_FILE).is_file():  # a run folder stands for its checkpoint
        path = path / MODEL_FILE
    if not path.is_file():
        raise KdcliError(f"checkpoint {checkpoint} is not a file (nor a run folder holding {MODEL_FILE})")
    meta = ckpt.read_meta(path, "--model")
    check_class_order(class_order, imbalance)
    data = open_data(dataset, image_column=image_column, label_column=label_column, eval_split=split,
                     augment="none")
    data.set_input(meta.input_size, meta.interpolation, meta.crop_pct)  # the checkpoint's own input
    corruption = (data.corrupt(noise, imbalance, corruption_seed, class_order, split="eval")
                  if noise or imbalance else None)
    facts = data_facts(data)
    loaded = models.load(str(path), facts, ignore_class_names=ignore_class_names)
    names = [teacher] if isinstance(teacher, str) else list(teacher or [])
    weights = [teacher_weights] if isinstance(teacher_weights, str) else list(teacher_weights or [None] * len(names))
    if len(weights) != len(names):
        raise KdcliError(f"--teacher-weights given {len(weights)} times for {len(names)} --teacher: give one per "
                         "teacher, in the same order")
    t_all = [models.load(name, replace(facts, image_size=meta.input_size), weights=w,
                         ignore_class_names=ignore_class_names, option="--teacher") for name, w in zip(names, weights,
                                                                                                     strict=True)]
    t_loaded = t_all[0] if t_all else None
    t_model = models.Ensemble([t.model for t in t_all]) if len(t_all) > 1 else (t_loaded.model if t_all else None)
    accelerator = make_accelerator(precision, 0)
    model = loaded.model.to(accelerator.device).eval()
    if t_model is not None:
        t_model.to(accelerator.device).eval()
    loader = accelerator.prepare(make_loader(data, data.eval_dataset(), batch_size,
                                             workers if workers is not None else default_workers(data)))
    sess = Session(cfg, accelerator, data, model, t_model, methods.build("ce"),
                   None, None, loader, loaded, t_loaded, frozenset({"logits"}))
    metrics = sess.evaluate()
    return rep.EvalReport(created=rep.now(), checkpoint=model_info(loaded),
                          teacher=model_info(t_loaded) if t_loaded else None,
                          teachers=[model_info(t) for t in t_all] or None,
                          data=data_info(data, corruption, {"eval": sess.eval_skipped}),
                          environment=rep.environment(str(accelerator.device), accelerator.num_processes, precision),
                          metrics=rep.MetricsBlock(final=metrics))
