"""The two training tasks: what a batch is, what the loss is, how a split is evaluated.

A micro-batch is addressed by ``consumed``, the number of training samples all ranks together
had consumed before it (Megatron's consumed_train_samples); rank r takes the ``micro`` samples
from ``consumed + r * micro``. All randomness in the data (sample order, augmentation) derives
from the seed and sample indices, so a resumed run needs only ``consumed`` to see exactly the
samples the uninterrupted run would have seen, even on a different number of ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moge_ds.config import Config
from moge_ds.data.documents import DataError
from moge_ds.data.images import ImageSet, augment, fashion_mnist, hf_images, image_folder, normalize
from moge_ds.data.text import build_text_splits, lm_batch, one_epoch_samples
from moge_ds.data.tokenizer import load_tokenizer
from moge_ds.distributed import collective_device
from moge_ds.gate import set_sigma_step
from moge_ds.hf.balance import CorrectionBiasBalancer
from moge_ds.hf.families import family
from moge_ds.hf.families import read_config as read_hf_config
from moge_ds.hf.loss import RoutingRecord, causal_lm_loss
from moge_ds.hf.routers import unwrap
from moge_ds.monitor import neighbour_terms, reduce_expert_counts
from moge_ds.topographic import PoolingCache, SigmaSchedule, default_map_shape


class Task:
    """What the trainer needs of a task; the subclasses below are the tasks."""

    unit: str  # what throughput counts: "tokens" or "images"

    def train_batch(self, consumed: int) -> dict[str, torch.Tensor]:
        """This rank's share of the micro-batch that starts at global sample ``consumed``."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(task_loss, l_aux, items)`` for one micro-batch at training step ``step`` (MoGE's sigma
        schedule follows it); items = tokens or images in the micro-batch."""
        raise NotImplementedError

    def evaluate(self, model, split: str, batches: int | None) -> dict[str, float]:
        """Metrics on ``batches`` micro-batches per rank of ``split`` ("valid"/"test"); None: all of it."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called on every rank after each optimizer step (a collective where a task balances its
        routers: a Hugging Face model's correction bias)."""

    def routing_terms(self) -> dict[str, float]:
        """The last micro-batch's routing diagnostics that the task itself records (a Hugging Face
        model's); our models' MoGE gates report theirs (``monitor.gate_terms``)."""
        return {}

    def expert_loads(self) -> list[torch.Tensor]:
        """Per MoE layer the fraction of tokens per expert in the last micro-batch, over all ranks, where
        the task records routing itself (as ``routing_terms``). Collective: every rank calls it."""
        return []


def _all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class LanguageModelling(Task):
    """Next-token prediction on megatron-core GPT samples; evaluates loss and perplexity."""

    unit = "tokens"

    def __init__(self, config: Config, micro_batch: int, rank: int, world: int, total_micro_batches: int,
                 device: torch.device):
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        model_vocab = self.model_vocab(config)
        if model_vocab is not None and self.tokenizer.vocab_size > model_vocab:
            raise DataError(f"data.tokenizer {config.data.tokenizer} has {self.tokenizer.vocab_size} tokens, more than "
                            f"the {model_vocab} of the model (model.vocab_size, or a Hugging Face model's config): use "
                            f"the tokenizer the model was made for, or a vocabulary >= {self.tokenizer.vocab_size}")
        self.micro, self.rank, self.world, self.device = micro_batch, rank, world, device
        data = config.data
        # A held-out split is one pass over its documents, whoever evaluates it: the trainer and
        # moge_ds.evaluate see the same samples whatever their batch size and rank count.
        held_out = one_epoch_samples(data.prefixes, data.split, config.model.seq_length)[1:] \
            if data.weights is not None else (None, None)
        self.splits = build_text_splits(data.prefixes, data.weights, self.tokenizer, config.model.seq_length,
                                        (total_micro_batches * micro_batch * world, *held_out), data.split,
                                        config.train.seed)
        evaluated = set(config.train.final_eval) | ({"valid"} if config.train.eval_interval else set())
        for name in [s for s in ("valid", "test") if s in evaluated]:
            if getattr(self.splits, name) is None:
                raise DataError(f"data.split {data.split!r} gives the {name} split no share, but the run evaluates "
                                f"it (train.final_eval {config.train.final_eval}, train.eval_interval "
                                f"{config.train.eval_interval}): give it a share or stop evaluating it")

    @staticmethod
    def model_vocab(config: Config) -> int | None:
        """The model's vocabulary, if fixed already (an export's); None: it is made for the tokenizer."""
        return config.model.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch(self, dataset, start: int) -> dict[str, torch.Tensor]:
        """``micro`` samples of ``dataset`` from index ``start``, on this rank's device."""
        return {k: v.to(self.device) for k, v in lm_batch(dataset, start, self.micro).items()}

    def train_batch(self, consumed: int) -> dict[str, torch.Tensor]:
        return self.batch(self.splits.train, consumed + self.rank * self.micro)

    def logits(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, S, V]`` next-token logits of ``tokens`` ``[B, S]``."""
        return model(tokens)[0]

    def loss(self, model, batch, step):
        set_sigma_step(model, step)
        logits, l_aux = model(batch["tokens"])
        mask = batch["loss_mask"].float()
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1), l_aux, batch["tokens"].numel()

    @torch.no_grad()
    def evaluate(self, model, split: str, batches: int | None) -> dict[str, float]:
        """Every sample of ``split`` once (``batches``: the first ``batches`` micro-batches per rank),
        sharded across ranks; each rank runs the same number of forward passes."""
        dataset = self.splits.valid if split == "valid" else self.splits.test
        total_nll = total_tokens = 0.0
        for index, valid in shard_indices(len(dataset), self.micro, self.rank, self.world, batches):
            samples = [dataset[i] for i in index.tolist()]
            tokens = torch.stack([s["tokens"] for s in samples]).to(self.device)
            labels = torch.stack([s["labels"] for s in samples]).to(self.device)
            mask = torch.stack([s["loss_mask"] for s in samples]).float() * valid[:, None]
            logits = self.logits(model, tokens)
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            total_nll += (nll * mask.flatten().to(nll.device)).sum().item()
            total_tokens += mask.sum().item()
        total_nll, total_tokens = _all_reduce_sum([total_nll, total_tokens])
        loss = total_nll / max(total_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tokens}


def shard_indices(size: int, micro: int, rank: int, world: int, batches: int | None):
    """``(index, valid)`` per micro-batch of this rank's share of ``size`` items (``valid`` is 0./1.).

    Rank r owns items ``[r * per_rank, (r + 1) * per_rank)``, so every rank runs the same number of
    batches (MoE all-to-alls pair up); the last rank's items past ``size`` repeat the last item and
    are marked invalid. ``batches`` caps the micro-batches per rank.
    """
    per_rank = math.ceil(size / world)
    if batches is not None:
        per_rank = min(per_rank, batches * micro)
    for start in range(0, per_rank, micro):
        index = torch.arange(start, min(start + micro, per_rank)) + rank * per_rank
        yield index.clamp(max=size - 1), (index < size).float()


def load_images(spec: str, split: str) -> ImageSet:
    """``fashion_mnist``, ``folder:<dir>`` (``<dir>/<split>/<class>/...``) or ``hf:<name>``."""
    if spec == "fashion_mnist":
        return fashion_mnist(split)
    if spec.startswith("folder:"):
        return image_folder(f"{spec[7:]}/{split}")
    if spec.startswith("hf:"):
        return hf_images(spec[3:], split)
    raise DataError(f"data.images must be 'fashion_mnist', 'folder:<dir>' or 'hf:<name>', got {spec!r}")


class ImageClassification(Task):
    """Cross-entropy on in-memory images; evaluates loss and top-1 accuracy."""

    unit = "images"

    def __init__(self, config: Config, micro_batch: int, rank: int, world: int, device: torch.device):
        train = load_images(config.data.images, "train")
        test = load_images(config.data.images, "test")
        held_out = config.data.valid_images
        if not 0 < held_out < len(train.labels):
            raise DataError(f"data.valid_images must be in (0, {len(train.labels)}), got {held_out}")
        # A fixed split: the same validation images for every seed, so runs compare on equal terms.
        order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))
        self.train_images, self.train_labels = train.images[order[held_out:]], train.labels[order[held_out:]]
        self.eval_sets = {"valid": (train.images[order[:held_out]], train.labels[order[:held_out]]),
                          "test": (test.images, test.labels)}
        self.classes = train.classes
        self.micro, self.rank, self.world, self.device = micro_batch, rank, world, device
        self.seed, self.augment = config.train.seed, config.data.augment

    def train_batch(self, consumed: int) -> dict[str, torch.Tensor]:
        n = len(self.train_labels)
        start = consumed + self.rank * self.micro
        epoch, offset = divmod(start, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        index = order[(offset + torch.arange(self.micro)) % n]
        images = self.train_images[index]
        if self.augment:
            images = augment(images, torch.Generator().manual_seed(self.seed * 7919 + start))
        return {"images": normalize(images).to(self.device), "labels": self.train_labels[index].to(self.device)}

    def loss(self, model, batch, step):
        set_sigma_step(model, step)
        logits, l_aux = model(batch["images"])
        return F.cross_entropy(logits.float(), batch["labels"]), l_aux, batch["labels"].numel()

    @torch.no_grad()
    def evaluate(self, model, split: str, batches: int | None) -> dict[str, float]:
        """The first ``batches`` micro-batches per rank of ``split`` (None: all of it), sharded across ranks."""
        images, labels = self.eval_sets[split]
        nll = correct = count = 0.0
        for index, valid in shard_indices(len(labels), self.micro, self.rank, self.world, batches):
            logits, _ = model(normalize(images[index]).to(self.device))
            target, valid = labels[index].to(self.device), valid.to(self.device)
            nll += (F.cross_entropy(logits.float(), target, reduction="none") * valid).sum().item()
            correct += ((logits.argmax(-1) == target).float() * valid).sum().item()
            count += valid.sum().item()
        nll, correct, count = _all_reduce_sum([nll, correct, count])
        return {"loss": nll / count, "accuracy": correct / count, "images": count}


class HFLanguageModelling(LanguageModelling):
    """Language modelling with a Hugging Face MoE causal LM: its own loss (load balancing included)
    plus MoGE's term on its router logits; evaluated like our GPT (cross-entropy, perplexity)."""

    @staticmethod
    def model_vocab(config: Config) -> int:
        return read_hf_config(config.model.hf_path).vocab_size

    def __init__(self, config: Config, micro_batch: int, rank: int, world: int, total_micro_batches: int,
                 device: torch.device):
        super().__init__(config, micro_batch, rank, world, total_micro_batches, device)
        moe = config.moe
        self.moe = moe
        self.sigma = SigmaSchedule(moe.sigma_steps or config.train.steps, moe.sigma_max, moe.sigma_min,
                                   moe.sigma_gamma)
        self.routing: RoutingRecord | None = None  # the last training micro-batch's
        self.pooling = PoolingCache()
        self.balancer: CorrectionBiasBalancer | None = None  # made at the first training forward (AutoEP's routers)

    def logits(self, model, tokens):
        return model(input_ids=tokens).logits

    def loss(self, model, batch, step):
        if self.moe.bias_update_rate > 0 and self.balancer is None:
            self.balancer = CorrectionBiasBalancer(model, family(unwrap(model).config), self.moe.bias_update_rate)
        hf_loss, l_aux, self.routing = causal_lm_loss(model, batch, self.moe, self.sigma.value(step), self.pooling)
        return hf_loss, l_aux, batch["tokens"].numel()

    def after_step(self) -> None:
        if self.balancer is not None:
            self.balancer.step()

    def routing_terms(self) -> dict[str, float]:
        """As the native gates log them: sigma, MoGE's term (mean per layer, unweighted; MoGE only), the noise-free
        top-2 neighbour rate per layer; and ``router_aux_loss``, the model's own load-balancing term."""
        record = self.routing
        terms = {"sigma": record.sigma}
        if record.group_sparsity_loss is not None:
            terms["group_sparsity_loss"] = record.group_sparsity_loss.item()
        if record.load_balance_loss is not None:
            terms["router_aux_loss"] = record.load_balance_loss.item()
        experts = record.map_values[0].shape[1]
        shape = tuple(self.moe.map_shape) if self.moe.map_shape else default_map_shape(experts)
        return {**terms, **neighbour_terms(record.map_values, shape, self.moe.padding == "circular")}

    def expert_loads(self) -> list[torch.Tensor]:
        """From each layer's top-k router scores (DeepSeek-V3's correction bias and group limits, which
        only steer the choice, are not applied here)."""
        record = self.routing
        return reduce_expert_counts([torch.bincount(v.topk(record.top_k, dim=-1).indices.flatten(),
                                                    minlength=v.shape[1]) for v in record.map_values])


def build_task(config: Config, micro_batch: int, rank: int, world: int, total_micro_batches: int,
               device: torch.device) -> Task:
    if config.model.kind == "gpt":
        return LanguageModelling(config, micro_batch, rank, world, total_micro_batches, device)
    if config.model.kind == "hf":
        return HFLanguageModelling(config, micro_batch, rank, world, total_micro_batches, device)
    return ImageClassification(config, micro_batch, rank, world, device)
