"""`selfsup zeroshot`: classify images by naming their classes in words, and retrieve across modalities,
with a run of a method that aligns an image and a text tower (`inputs="pairs"`: CLIP).

Zero-shot classification (Radford et al. 2021, section 3.1.4): every class name is written into
each prompt template ("an emoji of {}."), the texts are embedded by the text tower into the shared
space, normalised, averaged over templates and normalised again (the paper's prompt ensembling);
a class's name can be replaced by words its captions use (`--describe "Flags=flag"`, several with
`|`, averaged too), as the paper renames classes whose labels are not how people describe them;
an image's class is the one whose embedding is nearest to the image's, and its probabilities are the
softmax of the run's own logit scale times the cosine similarities. Nothing labelled is trained on.
The predictions are written in `selfsup predict`'s CSV layout (id, label, prediction, confidence,
group columns, p_<class>), so `selfsup evaluate --predictions` audits zero-shot errors per group.

Retrieval: the held-out pairs' images against their first captions, recall@1/5/10 both ways
(image -> text: is the image's own caption among the k nearest captions; text -> image likewise).

A pairs method's towers are `image` and `text`; its trained joining parameters (CLIP's projections
and logit scale) are the files named in its `MethodSpec.artifacts`, loaded back into the method.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from selfsup.config import RunConfig, load_config
from selfsup.data.tokenizer import TextTokenizer
from selfsup.data.views import normalise
from selfsup.errors import SelfsupError
from selfsup.export.encoder import load_encoder
from selfsup.files import write_atomic
from selfsup.methods import build_method, method_spec
from selfsup.modalities import load_splits, run_modality
from selfsup.modalities.image_text import RECALL_AT, image_embeddings, retrieval_recall, text_embeddings
from selfsup.rundir import CONFIG_FILE, ZEROSHOT_DIR, starting_towers, tower_dir
from selfsup.train.runtime import Runtime, init_runtime

log = logging.getLogger("selfsup")

ZEROSHOT_JSON = "zeroshot.json"
PAIR_TOWERS = ("image", "text")
DEFAULT_TEMPLATE = "{}"


@dataclass
class PairModel:
    """A pairs method with its trained towers and joining parameters, and how each tower reads."""

    method: nn.Module
    cfg: RunConfig
    image_preprocess: dict[str, Any]
    tokenizer: TextTokenizer
    seq_len: int

    def image_embeddings(self, images: Tensor, runtime: Runtime) -> Tensor:
        """Unit embeddings [N, E] (float32, CPU) of uint8 images [N, C, H, W]."""
        pre = self.image_preprocess
        prepare = lambda x: normalise(x, pre["mean"], pre["std"], pre["image_size"])  # noqa: E731
        # unit length again in float32: under bf16 autocast the method's own normalisation is bf16
        return torch.nn.functional.normalize(image_embeddings(self.method, images, prepare, runtime), dim=-1)

    def text_embeddings(self, texts: list[str], runtime: Runtime) -> Tensor:
        """Unit embeddings [N, E] (float32, CPU) of texts, tokenized as the run's captions were."""
        embedded = text_embeddings(self.method, texts, self.tokenizer, self.seq_len, runtime)
        return torch.nn.functional.normalize(embedded, dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.method.logit_scale.detach().exp())


def load_pair_model(run: Path, untrained: bool = False) -> PairModel:
    """The run's method over its saved towers with its artifacts loaded (or, `untrained`, the method as
    pretraining began: same seed, same order of construction)."""
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise SelfsupError(f"{run}: not a pretraining run (no {CONFIG_FILE})")
    cfg = load_config(run / CONFIG_FILE)
    spec = method_spec(cfg.method["name"])
    if spec.roles != PAIR_TOWERS:
        raise SelfsupError(f"{run}: a {cfg.method['name']} run has the towers {', '.join(spec.roles)}; zero-shot "
                           f"classification needs a method that aligns an image and a text tower, such as CLIP")
    towers, metas = {}, {}
    for role in spec.roles:
        towers[role], metas[role] = load_encoder(tower_dir(run, role, spec.roles))
    if untrained:  # as pretraining began: the same seed, the same order, the method's heads after the towers
        towers = starting_towers(cfg.seed, {role: meta["encoder"] for role, meta in metas.items()})
    method = build_method(dict(cfg.method), **towers)
    if not untrained:
        for name in spec.artifacts:
            _load_artifact(method, run / name)
    text_pre = metas["text"]["preprocess"]
    text_folder = tower_dir(run, "text", spec.roles)
    tokenizer = TextTokenizer.load(text_folder / text_pre["tokenizer"])
    return PairModel(method.eval(), cfg, metas["image"]["preprocess"], tokenizer, int(text_pre["seq_len"]))


def _load_artifact(method: nn.Module, path: Path) -> None:
    """Trained parameters of the method saved beside its towers (CLIP's projections and logit scale)."""
    if not path.is_file():
        raise SelfsupError(f"{path}: not found; it is written when the run finishes (resume the run with --resume)")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error types for truncated or corrupt files
        raise SelfsupError(f"{path}: cannot read it ({err})") from None
    own = dict(method.named_parameters())
    wrong = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise SelfsupError(f"{path}: {wrong[0]} does not fit the method's parameters; was it written by this run?")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def class_embeddings(model: PairModel, classes: list[str], templates: list[str], runtime: Runtime,
                     names: dict[str, list[str]] | None = None) -> Tensor:
    """[K, E]: each class's names (its own, or those `names` gives it) in every template, embedded,
    averaged over names and templates and normalised."""
    for template in templates:
        if "{}" not in template:
            raise SelfsupError(f"--template {template!r} has no {{}} where the class name goes, e.g. \"an emoji of {{}}.\"")
    names = names or {}
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SelfsupError(f"--describe {unknown[0]!r}: no such class; the classes are {', '.join(classes)}")
    out = []
    for name in classes:
        texts = [template.replace("{}", word) for word in names.get(name, [name]) for template in templates]
        out.append(model.text_embeddings(texts, runtime).mean(dim=0))  # [E]
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)  # [K, E]


def parse_descriptions(items: list[str]) -> dict[str, list[str]]:
    """`CLASS=TEXT|TEXT...` items -> {class: [texts]} (a class named twice gets both lists)."""
    names: dict[str, list[str]] = {}
    for item in items:
        name, sep, texts = item.partition("=")
        words = [t.strip() for t in texts.split("|") if t.strip()]
        if not sep or not name.strip() or not words:
            raise SelfsupError(f"--describe {item!r}: write CLASS=TEXT, or CLASS=TEXT|TEXT for several, "
                               "e.g. \"Flags=flag\"")
        names.setdefault(name.strip(), []).extend(words)
    return names


def zero_shot(run: Path, *, data: str | None = None, templates: list[str] | None = None,
              names: dict[str, list[str]] | None = None, out: Path | None = None,
              compare_untrained: bool = False, runtime: Runtime | None = None) -> dict[str, Any]:
    """Zero-shot classification of the run's held-out images (or every row of `data`) and retrieval on
    the held-out pairs; writes OUT/predictions.csv and OUT/zeroshot.json (OUT: RUN/zeroshot)."""
    from selfsup.adapt.run import write_predictions  # adapt sits beside evaluate; its CSV writer is shared

    run = Path(run)
    out = Path(out) if out is not None else run / ZEROSHOT_DIR
    if out.exists() and not out.is_dir():  # checked before the towers are loaded and the rows embedded
        raise SelfsupError(f"{out}: exists and is not a directory; choose another --out")
    templates = templates or [DEFAULT_TEMPLATE]
    runtime = runtime or init_runtime("auto", "auto")
    model = load_pair_model(run)
    model.method.to(runtime.device)
    cfg = model.cfg
    if data is None:
        train, split = load_splits(cfg)
        rows_scored = "held-out rows"
    else:
        data_cfg = replace(cfg, data=replace(cfg.data, source=data))
        train, holdout = load_splits(data_cfg)
        split = run_modality(data_cfg).join(train, holdout)
        rows_scored = f"every row of {data}"
    if len(split) == 0:  # data.holdout_fraction=0 (or too few rows to hold one out)
        raise SelfsupError(f"{run}: the run has no held-out rows to classify (data.holdout_fraction="
                           f"{cfg.data.holdout_fraction}); classify a labelled source instead with --data")
    if split.labels is None or split.classes is None or not bool((split.labels >= 0).any()):
        raise SelfsupError(f"{data or cfg.data.source}: the rows to classify ({rows_scored}) carry no labels, so "
                           "there are no class names to prompt with; use a labelled source (--data)")
    classes = list(split.classes)
    result: dict[str, Any] = {"run": str(run), "data": data or cfg.data.source, "rows": rows_scored,
                              "templates": templates, "classes": classes, "num_classes": len(classes),
                              "descriptions": names or {}}
    scored = {"pretrained": model}
    if compare_untrained:
        scored["untrained"] = load_pair_model(run, untrained=True)
        scored["untrained"].method.to(runtime.device)
    labelled = split.labels >= 0
    for name, which in scored.items():
        images = which.image_embeddings(split.images, runtime)  # [N, E]
        classes_e = class_embeddings(which, classes, templates, runtime, names)  # [K, E]
        probs = (which.logit_scale * images @ classes_e.T).softmax(dim=1)  # [N, K]
        predicted = probs.argmax(dim=1)
        accuracy = float((predicted[labelled] == split.labels[labelled]).float().mean())
        section = {"accuracy": accuracy, "num_scored": int(labelled.sum())}
        if len(split) >= 2:  # each image against its first caption
            section["retrieval"] = retrieval_recall(images @ which.text_embeddings(split.texts, runtime).T, RECALL_AT)
        result[name] = section
        if name == "pretrained":
            write_predictions(out / "predictions.csv", split, probs, classes)
    out.mkdir(parents=True, exist_ok=True)
    counts = torch.bincount(split.labels[labelled], minlength=len(classes)).float()
    result["chance"] = {"uniform": 1 / len(classes), "majority": float(counts.max() / counts.sum())}
    result["retrieval_chance"] = {f"r{k}": min(1.0, k / len(split)) for k in RECALL_AT}
    write_atomic(out / ZEROSHOT_JSON, json.dumps(result, indent=2))
    result["text"] = format_zero_shot(result, out)
    return result


def format_zero_shot(result: dict[str, Any], out: Path) -> str:
    """What `selfsup zeroshot` prints."""
    chance = result["chance"]
    lines = [f"zero-shot on {result['rows']} of {result['data']}: {result['num_classes']} classes, "
             f"templates {result['templates']}",
             f"{'':12} accuracy   " + "  ".join(f"i2t@{k:<3} t2i@{k:<3}" for k in RECALL_AT)]
    for name in ("pretrained", "untrained"):
        if name not in result:
            continue
        section = result[name]
        recall = section.get("retrieval")
        cells = "  ".join(f"{recall[f'i2t_r{k}']:7.3f} {recall[f't2i_r{k}']:7.3f}" for k in RECALL_AT) if recall else ""
        lines.append(f"{name:12} {section['accuracy']:8.3f}   {cells}")
    lines.append(f"chance: {chance['uniform']:.3f} uniform, {chance['majority']:.3f} majority class; retrieval "
                 + ", ".join(f"r@{k} {result['retrieval_chance'][f'r{k}']:.4f}" for k in RECALL_AT))
    lines.append(f"wrote {out / 'predictions.csv'} and {out / ZEROSHOT_JSON}; audit per group: "
                 f"selfsup evaluate --predictions {out / 'predictions.csv'} --groups ...")
    return "\n".join(lines)


__all__ = ["PairModel", "class_embeddings", "load_pair_model", "zero_shot"]
