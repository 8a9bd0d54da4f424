"""``finetune``: recover accuracy after compression, distilling from the uncompressed model.

The loss is a weighted sum of registered terms (`torchslim.recover.losses`):
``alpha * kd(T) + (1 - alpha) * <loss.name> + feature_weight * feature + attention_weight * attention``.
The teacher is the model before any step unless ``distill.teacher`` names another model spec. Data without
labels trains on the teacher alone (logits, or embeddings for encoders). Pruning masks stay applied throughout,
so pruned weights stay zero. Training runs on `torchslim.recover.trainer.Trainer`: checkpoints, resume,
early stopping, mixed precision and torchrun all come from there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from torchslim._config import check, to_dict
from torchslim.core.modules import call_model
from torchslim.errors import InputError, shorten
from torchslim.recover.features import (
    TappedStudent, TappedTeacher, attention_heads, find_attention, find_module, projection,
)
from torchslim.recover.losses import get_loss
from torchslim.recover.trainer import SplitDataset, TrainConfig, Trainer, batch_collate, to_device
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable


@dataclass
class LossConfig:
    """The hard-label loss: "cross_entropy" (with ``label_smoothing``) or "focal" (``gamma``; smoothing too)."""

    name: Literal["cross_entropy", "focal"] = "cross_entropy"
    label_smoothing: float = 0.0
    gamma: float = 2.0

    def __post_init__(self) -> None:
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.gamma >= 0, "gamma", f"must be >= 0, got {self.gamma}")


@dataclass
class DistillConfig:
    """Knowledge distillation from the teacher.

    Args:
        temperature: softens both logit distributions (KD is scaled by T^2).
        alpha: weight of the logit/embedding term; ``1 - alpha`` goes to the hard-label loss.
        embedding: encoders' output distance, "cosine" (1 - cos) or "mse".
        features: ``[[student_layer, teacher_layer], ...]`` pairs of module names whose outputs are matched
            (through a learned projection when the widths differ).
        feature_loss: "mse" or "cosine" for the feature pairs.
        feature_weight: weight of the feature term.
        attention: distil the last attention layer's attention and value relations (MiniLM-style).
        attention_weight: weight of the attention term.
        teacher: a model spec for another teacher (default: the model before compression).
    """

    temperature: float = 4.0
    alpha: float = 0.7
    embedding: Literal["cosine", "mse"] = "cosine"
    features: list[list[str]] = field(default_factory=list)
    feature_loss: Literal["mse", "cosine"] = "mse"
    feature_weight: float = 1.0
    attention: bool = False
    attention_weight: float = 1.0
    teacher: str | None = None

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")
        check(self.attention_weight >= 0, "attention_weight", f"must be >= 0, got {self.attention_weight}")
        for i, pair in enumerate(self.features):
            check(len(pair) == 2, f"features[{i}]", f"expected [student_layer, teacher_layer], got {shorten(pair)}")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Config of ``finetune: {...}`` (method ``distill``, the default): the `TrainConfig` fields (epochs,
    batch_size, optimizer, schedule, grad_clip, accumulate, precision, device, early_stop, checkpoint_every)
    plus the losses.

    Args:
        loss: the hard-label loss (used where the data has labels and ``alpha < 1``).
        distill: distillation settings; ``null`` trains on labels alone.
    """

    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig | None = field(default_factory=DistillConfig)
    version: int = 2


def _teacher_model(context, distill: DistillConfig | None) -> nn.Module:
    if distill is None or distill.teacher is None:
        return context.teacher
    try:
        return context.resolve_model(distill.teacher)
    except InputError as error:
        raise InputError(f"{context.where}.distill.teacher: {error}") from None


def _student_and_teacher(context, config: FinetuneConfig, teacher_model: nn.Module):
    """Wrap both models with the taps distillation reads; projections sized on one real batch."""
    distill = config.distill
    pairs = list(distill.features) if distill else []
    where = f"{context.where}.distill"
    if context.bundle.task == "lm" and distill is not None:
        pairs.insert(0, [_lm_head(context.model, where), _lm_head(teacher_model, where)])  # logits, for token KD
    for i, (s, t) in enumerate(pairs):
        find_module(context.model, s, f"{where}.features[{i}][0] (student)")
        find_module(teacher_model, t, f"{where}.features[{i}][1] (teacher)")
    s_attn = t_attn = None
    heads = 1
    if distill and distill.attention:
        s_attn = find_attention(context.model, f"{where}.attention (student)")
        t_attn = find_attention(teacher_model, f"{where}.attention (teacher)")
        heads = attention_heads(teacher_model)
    teacher = TappedTeacher(teacher_model, [t for _, t in pairs], t_attn)
    student = TappedStudent(context.model, [s for s, _ in pairs], s_attn, [])
    if pairs or s_attn:
        inputs, _ = next(context.data.batches("train", context.bundle.preprocess, 2))
        with torch.no_grad():
            _, s_feats, s_states = call_model(student, inputs)
            _, t_feats, t_states = teacher(inputs)
        student.projections = nn.ModuleList(projection(s, t) for s, t in zip(s_feats, t_feats))
        for states, name in ((s_states, "student"), (t_states, "teacher")):
            for key, value in states.items():
                if value.shape[-1] % heads:
                    raise InputError(f"{where}.attention: the {name}'s {key} width {value.shape[-1]} does not "
                                     f"split into the teacher's {heads} heads")
    return student, teacher, heads


def _lm_head(model: nn.Module, where: str) -> str:
    from torchslim.core.modules import output_head

    head, _ = output_head(model)
    if head is None:
        raise InputError(f"{where}: found no output head (get_output_embeddings) to distil the language model's "
                         f"logits from")
    return head


def _lm_terms(outputs, s_feats, t_feats, inputs, distill, alpha: float) -> dict:
    """Causal LMs: the next-token NLL (the text is its own label) and token-level KD on the head's logits at
    every real position; ``s_feats[0]``/``t_feats[0]`` are those logits (see `_student_and_teacher`)."""
    terms = {}
    if alpha < 1:
        terms["lm_nll"] = (1 - alpha) * outputs[:, 0].sum() / outputs[:, 1].sum().clamp_min(1)
    if alpha > 0:
        real = _attention_mask(inputs)[:, 1:].bool()
        student, teacher = s_feats[0][:, :-1][real], t_feats[0][:, :-1][real]
        terms["kd"] = alpha * get_loss("kd")(student, teacher, distill.temperature)
    return terms


def _attention_mask(inputs) -> torch.Tensor | None:
    if isinstance(inputs, (tuple, list)) and len(inputs) >= 2 and inputs[1].shape == inputs[0].shape:
        return inputs[1]
    return None


def _make_loss(context, config: FinetuneConfig, teacher: TappedTeacher, heads: int):
    """The weighted loss terms. Click-through models ("ctr": one logit per sample) use binary forms: BCE for
    the labels, whatever ``loss.name``, and the two-class KD."""
    distill = config.distill
    task = context.bundle.task
    labelled = (context.data.has_labels and task in ("classification", "ctr")) or task == "lm"
    if distill is None and not labelled:
        raise InputError(f"{context.where}.distill: the data has no labels, so fine-tuning needs distillation")
    alpha = 1.0 if not labelled else (distill.alpha if distill else 0.0)
    hard_name = "bce" if task == "ctr" else config.loss.name
    hard = get_loss(hard_name)
    kd = get_loss("binary_kd" if task == "ctr" else "kd")

    def loss_fn(outputs, inputs, labels):
        outputs, s_feats, s_states = outputs
        terms = {}
        t_out, t_feats, t_states = teacher(inputs) if distill else (None, [], {})
        if task == "lm":
            terms.update(_lm_terms(outputs, s_feats, t_feats, inputs, distill, alpha))
            s_feats, t_feats = s_feats[1:], t_feats[1:]
        elif alpha > 0:
            if context.bundle.task == "embedding":
                terms["embedding"] = alpha * get_loss("embedding")(outputs, t_out, distill.embedding)
            else:
                terms["kd"] = alpha * kd(outputs, t_out, distill.temperature)
        if alpha < 1 and task != "lm":
            terms[hard_name] = (1 - alpha) * hard(outputs, labels, label_smoothing=config.loss.label_smoothing,
                                                  gamma=config.loss.gamma)
        if s_feats:
            feature = sum(get_loss("feature")(s, t, distill.feature_loss) for s, t in zip(s_feats, t_feats))
            terms["feature"] = distill.feature_weight * feature / len(s_feats)
        if s_states:
            terms["attention"] = distill.attention_weight * get_loss("attention")(s_states, t_states, heads,
                                                                                  _attention_mask(inputs))
        return terms

    return loss_fn


def _ctr_validation_sum(outputs: torch.Tensor, labels: torch.Tensor | None, reference) -> float:
    """Click-through models: minus the summed log-loss on the labels (a sum, so that ranks add up), else minus
    the summed absolute difference of click probabilities to the teacher's."""
    if labels is not None:
        return -float(torch.nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1).cpu(), labels.float().reshape(-1), reduction="sum"))
    return -float((torch.sigmoid(outputs) - torch.sigmoid(reference())).abs().sum())


def _make_validate(context, teacher: nn.Module, batch_size: int):
    """Validation metric on the ``val`` split, summed per rank and reduced: accuracy with labels, else agreement
    with (classifiers) or mean cosine to (encoders) the teacher; for click-through models minus the mean log-loss
    (or minus the mean click-probability difference to the teacher); for causal LMs minus the mean token NLL."""
    from torchslim.recover import distributed

    samples = context.data.splits.get("val") or []
    if len(samples) == 0:
        return None
    labels = context.data.labels.get("val")
    info = distributed.current()
    shard = range(info.rank, len(samples), info.world_size)

    def validate(student: TappedStudent, device) -> float:
        total = count = 0.0
        for start in range(0, len(shard), batch_size):
            index = list(shard[start:start + batch_size])
            inputs = to_device(context.bundle.preprocess([samples[i] for i in index]), device)
            outputs = call_model(student.model, inputs).float()
            weight = len(index)
            if context.bundle.task == "lm":  # minus the mean next-token NLL: a sum over tokens, not samples
                total -= float(outputs[:, 0].sum())
                weight = float(outputs[:, 1].sum())
            elif context.bundle.task == "embedding":
                reference = call_model(teacher, inputs).float()
                total += float(torch.nn.functional.cosine_similarity(outputs, reference, dim=-1).sum())
            elif context.bundle.task == "ctr":
                target = None if labels is None else torch.as_tensor(labels[index])
                total += _ctr_validation_sum(outputs, target, lambda: call_model(teacher, inputs).float())
            elif labels is not None:
                total += float((outputs.argmax(-1).cpu() == torch.as_tensor(labels[index])).sum())
            else:
                total += float((outputs.argmax(-1) == call_model(teacher, inputs).argmax(-1)).sum())
            count += weight
        total, count = distributed.all_reduce_sum([total, count], device)
        return total / max(count, 1.0)

    return validate


def _check_sparse_gradients(context, optimizer) -> None:
    """Embedding tables with ``sparse=True`` (recommenders') give sparse gradients, which only SGD and Adagrad
    without weight decay can apply: say so in one line rather than fail inside the optimiser."""
    from torchslim.recover.optim import parameter_groups

    sparse = {id(m.weight) for m in context.model.modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad}
    if not sparse:
        return
    where = f"{context.where}.optimizer"
    if optimizer.name not in ("sgd", "adagrad"):
        raise InputError(f"{where}.name: {optimizer.name} cannot apply the sparse gradients of the model's "
                         f"embedding tables; use adagrad or sgd (with weight_decay: 0)")
    for group in parameter_groups(list(context.model.named_parameters()), optimizer):
        if group["weight_decay"] and any(id(p) in sparse for p in group["params"]):
            raise InputError(f"{where}.weight_decay: weight decay would densify the sparse gradients of the "
                             f"model's embedding tables; set it to 0")


def fingerprint(context, config: FinetuneConfig, name: str = "finetune") -> tuple[str, str]:
    """(hash, description) identifying this training run by content: the resolved recipe up to this step, the
    run's name within the step, its config and the model's shapes (never how the recipe's path was spelled)."""
    shapes = {k: list(v.shape) for k, v in context.model.state_dict().items()}
    body = {"step": context.step_index, "run": name, "recipe": context.recipe_dict, "shapes": shapes,
            "config": to_dict(config), "seed": context.seed}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return digest, f"{context.where}, {sum(v.numel() for v in context.model.state_dict().values())} values"


@register_method("finetune", "distill", FinetuneConfig)
def finetune(context, config: FinetuneConfig, name: str = "finetune") -> TorchDeployable:
    """Fine-tune ``context.model`` in place; returns it with the training history in ``details``.

    Args:
        name: names this run's checkpoint folder within the step (a step may train more than once).
    """
    torch.manual_seed(context.seed)
    _check_sparse_gradients(context, config.optimizer)
    teacher_model = _teacher_model(context, config.distill)
    student, teacher, heads = _student_and_teacher(context, config, teacher_model)
    loss_fn = _make_loss(context, config, teacher, heads)
    data = context.data
    labels = data.labels.get("train") if data.has_labels else None
    digest, describe = fingerprint(context, config, name)
    trainer = Trainer(student, loss_fn, SplitDataset(data.splits["train"], labels),
                      batch_collate(context.bundle.preprocess, labels is not None), config,
                      validate=_make_validate(context, teacher_model, max(config.batch_size, 64)),
                      checkpoint_dir=context.checkpoint_dir(name), fingerprint=digest, describe=describe,
                      after_step=lambda: context.apply_masks(), seed=context.seed, description=context.where,
                      progress=context.progress)
    teacher_model.to(trainer.device)
    try:
        result = trainer.fit()
    finally:
        teacher_model.to("cpu")
        teacher.remove_taps()
        student.remove_taps()
    details = result.details()
    details["train_seconds"] = round(result.seconds, 2)
    return TorchDeployable(context.model, details=details)
