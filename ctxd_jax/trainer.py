"""The functional train step: LoRA-only gradients of compute_loss on packed batches, the optimizer of optim.py.

The model is split once into (graphdef, lora, rest); jitted functions merge it inside, differentiate only `lora`,
and donate the LoRA and optimizer state. Rows are processed in micro-batches of fixed shape (one compile), their
gradients summed: each micro-batch's loss is divided by the WHOLE batch's loss-token count (`loss_scale`; rows
holding samples with sequence ratios), so the sum equals the gradient of the full-batch loss (the reference's
normalisation, docs/reference.md "Loss").

With several processes (ctxd_jax/distributed.py) the mesh spans all of them and every process calls the same methods
in the same order, each with the same global batch, or with only its own rows of it (`Rows`, from `share`), or with
rows of its own (`local`: its part of a global batch whose other rows only the other processes have; `score` always
scores this process's own sequences); each process places only its own devices' rows. Jitted calls run under
`jax.set_mesh(mesh)`: the attention kernel reads the mesh there and runs per shard (models/attention.py), with the
batch's segment bound (segment_bound) as a static argument.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ctxd_jax import distributed, sharding
from ctxd_jax.divergence import hidden_divergence
from ctxd_jax.ema import ema_update
from ctxd_jax.finite import tree_finite
from ctxd_jax.loss import compute_loss, default_loss_scale, loss_count
from ctxd_jax.models.attention import segment_bound
from ctxd_jax.models.logprobs import hidden_logprobs
from ctxd_jax.optim import OptimConfig, lr_schedule, make_optimizer
from ctxd_jax.packing import TrainBatch
from ctxd_jax.scoring import ROW_KEYS, Scores, score_rows_jit, score_sequences

# Tokens per device in one call of Trainer.score (forward only: far less memory per token than a train step).
SCORE_TOKENS_PER_DEVICE = 16384
# Numbers of config.loss passed to compute_loss by name (traced there, not static).
LOSS_KEYS = ("token_mask_low", "token_mask_high", "geo_mask_low", "geo_mask_high", "sequence_mask_low",
             "sequence_mask_high", "sequence_clip_high", "kl_tau")


@dataclass(frozen=True)
class StepConfig:
    """Static settings of the step: loss hyper-parameters and the micro-batch / chunk shapes."""

    teacher_tau: float = 0.0
    student_tau: float = 0.0
    use_full_reward_baseline: bool = True
    topk_tau: float = 0.0
    topk_direction: str = "forward"
    ratio_type: str = "token"  # token | sequence
    masks: tuple[tuple[str, float], ...] = ()  # (name, value) for LOSS_KEYS
    micro_batch_rows: int = 0  # 0 = all rows at once
    chunk_size: int = 1024  # tokens per chunk of the log-prob head
    # The divergence over the whole vocabulary (topk_direction, jsd_beta) against the teacher run inside the step on
    # the batch's teacher rows, with LoRA teacher_lora: off | live | ema (an average with weight ema_decay).
    full_vocab: bool = False
    jsd_beta: float = 0.5
    teacher_lora: str = "off"
    ema_decay: float = 0.99


def micro_batch_loss(lora, rest, mb: dict, loss_scale, teacher_lora=None, *, graphdef, step: StepConfig,
                     max_segments=None):
    """(loss, metrics) of one micro-batch (a dict of TrainBatch fields) with the model nnx.merge(graphdef, lora, rest).
    With step.full_vocab the teacher (the model with `teacher_lora`, stop-gradient) runs on the batch's teacher rows."""
    model = nnx.merge(graphdef, lora, rest)
    topk_ids = mb.get("teacher_topk_ids")
    hidden = model(mb["tokens"], mb["positions"], mb["segment_ids"], max_segments=max_segments)
    out = hidden_logprobs(hidden, model.lm_head_kernel(), mb["tokens"], mb["segment_ids"], mb["temperatures"],
                          chunk_size=step.chunk_size, gather_ids=topk_ids)
    logprobs, entropy = out[0], out[1]
    student_topk = out[2] if topk_ids is not None else None
    full_kl = None
    if step.full_vocab:
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_lora), rest)
        teacher_hidden = teacher(mb["teacher_tokens"], mb["teacher_positions"], mb["teacher_segment_ids"],
                                 max_segments=max_segments)
        full_kl = hidden_divergence(hidden, teacher_hidden, model.lm_head_kernel(), mb["temperatures"],
                                    mb["teacher_index"], chunk_size=step.chunk_size, direction=step.topk_direction,
                                    beta=step.jsd_beta)
    loss, metrics = compute_loss(
        logprobs, mb["sampling_logprobs"], mb.get("teacher_logprobs"), mb["advantages"], mb["kl_gates"],
        mb["loss_mask"], teacher_tau=step.teacher_tau, student_tau=step.student_tau,
        use_full_reward_baseline=step.use_full_reward_baseline, segment_ids=mb["segment_ids"],
        loss_scale=loss_scale, student_topk_logprobs=student_topk,
        teacher_topk_logprobs=mb.get("teacher_topk_logprobs") if topk_ids is not None else None,
        topk_tau=step.topk_tau, topk_direction=step.topk_direction, ratio_type=step.ratio_type,
        jsd_beta=step.jsd_beta, full_vocab_kl=full_kl, **dict(step.masks))
    mask = mb["loss_mask"] & (mb["segment_ids"] > 0)
    metrics = dict(metrics, entropy_sum=jnp.sum(jnp.where(mask, entropy, 0.0)))
    return loss, metrics


class Rows(NamedTuple):
    """One process's share of a packed batch: the rows its devices hold (`index`: their row numbers in the batch,
    ascending), the batch's row count, and what else is computed from the whole batch: the loss scale that divides
    every micro-batch's loss and the segment bound (a static argument: every process must compile the same step).
    `local`: the other rows are other processes' own (results are read back for this process's rows only)."""

    batch: TrainBatch
    index: np.ndarray
    rows: int
    loss_scale: float
    bound: int
    local: bool = False


# compute_loss's metrics are means over a micro-batch's loss tokens, or over its samples for these: sums of
# (mean x count) over micro-batches divided by the summed counts give the whole batch's means.
_WEIGHT = {"teacher_seq_kl": "num_samples", "geo_seq_ratio": "num_samples", "sequence_ratio": "num_samples"}
_COUNTS = ("num_loss_tokens", "num_samples", "entropy_sum")


def _accumulate(acc, new):
    return jax.tree.map(jnp.add, acc, new)


def _apply_update(optimizer, lora, opt_state, grads, loss):
    """The update, or none (the old state kept: `ok` False) where the loss, the gradient or the result is not
    finite: a NaN or infinity never reaches the weights or the optimizer's moments."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    ok = jnp.isfinite(loss) & tree_finite(grads, new_lora, new_opt_state)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    return keep(new_lora, lora), keep(new_opt_state, opt_state), grad_norm, ok


class Trainer:
    """Holds (graphdef, lora, rest) and the optimizer state on `mesh`; `step(batch)` trains on one TrainBatch."""

    def __init__(self, model: nnx.Module, mesh: Mesh, optim: OptimConfig, step: StepConfig):
        self.mesh, self.optim_config, self.step_config = mesh, optim, step
        self.graphdef, self.lora, self.rest = nnx.split(model, nnx.LoRAParam, ...)
        if not jax.tree.leaves(self.lora):
            raise ValueError("lora.rank: the model has no LoRA parameters to train")
        self.schedule = lr_schedule(optim)
        self.optimizer = make_optimizer(optim)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._replicate = jax.jit(lambda tree: tree, out_shardings=self._replicated)
        self.opt_state = self._everywhere(jax.jit(self.optimizer.init)(self.lora))
        self.updates = 0  # optimizer steps taken (the lr schedule's position)
        self.dp = mesh.shape["fsdp"]
        self._batch_sharding = NamedSharding(mesh, sharding.batch_spec())
        loss = functools.partial(micro_batch_loss, graphdef=self.graphdef, step=step)
        self._grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnames="max_segments")
        self._add = jax.jit(_accumulate, donate_argnums=0)
        # Not a bound method: a Trainer that referred to itself would outlive its last use (until the cycle
        # collector runs), and with it its copy of the weights on the GPU.
        self._apply = jax.jit(functools.partial(_apply_update, self.optimizer), donate_argnums=(0, 1))
        self._zero_lora = None  # made on first use by base_lora()
        # teacher.lora=ema: the average starts at the initial LoRA state (the step-0 policy)
        self.ema = self.snapshot_lora() if step.teacher_lora == "ema" else None

    def _everywhere(self, tree):
        """With several processes, `tree` replicated over the whole mesh, so each process holds all of it: it writes
        the adapter from its own copy, and a restored checkpoint takes these placements (XLA would leave the optimizer's
        step count on each process's first device alone). One process: left as XLA placed it, so a single host runs
        exactly the programs it always did (pinning them changes the numerics of the step)."""
        return self._replicate(tree) if jax.process_count() > 1 else tree

    @property
    def micro_batch_rows(self) -> int:
        """Rows per micro-batch (0 = all): the configured value rounded up to a multiple of the data-parallel size."""
        mb = self.step_config.micro_batch_rows
        return -(-mb // self.dp) * self.dp if mb else 0

    @property
    def row_multiple(self) -> int:
        """Rows of a packed batch must be a multiple of this."""
        return self.micro_batch_rows or self.dp

    @property
    def local_row_multiple(self) -> int:
        """Rows of this process's packed batch must be a multiple of this (its share of every micro-batch)."""
        return self.row_multiple // jax.process_count()

    def _micro_rows(self, rows: int) -> int:
        mb = self.micro_batch_rows or rows
        if rows % mb or mb % self.dp:
            raise ValueError(f"trainer.micro_batch_rows: batch of {rows} rows is not a whole number of micro-batches "
                             f"of {mb} rows divisible by the data-parallel size {self.dp} (pack with row_multiple)")
        return mb

    def process_rows(self, rows: int, process: int) -> np.ndarray:
        """Row numbers (ascending) of a `rows`-row batch that the devices of `process` hold, micro-batch by
        micro-batch."""
        mb = self._micro_rows(rows)
        held = sorted({r for device, index in self._batch_sharding.devices_indices_map((mb,)).items()
                       if device.process_index == process for r in range(*index[0].indices(mb))})
        return np.asarray([start + r for start in range(0, rows, mb) for r in held], np.int64)

    def share(self, batch: TrainBatch | Rows, process: int) -> Rows:
        """The rows of `batch` that `process` needs (the whole batch when it holds every row)."""
        if isinstance(batch, Rows):
            return batch
        rows = batch.tokens.shape[0]
        index = self.process_rows(rows, process)
        mine = batch if len(index) == rows else TrainBatch(*(None if v is None else v[index] for v in batch))
        scale = default_loss_scale(batch.loss_mask, batch.segment_ids, ratio_type=self.step_config.ratio_type)
        return Rows(mine, index, rows, float(scale), segment_bound(batch.segment_ids))

    def local(self, batch: TrainBatch) -> Rows:
        """This process's packed rows (a multiple of row_multiple / processes) as its part of a global batch that
        every process joins with its own: the processes agree on the row count (filler rows pad the others up to the
        largest), the loss scale (their summed counts) and the segment bound; nothing else crosses between them."""
        count = loss_count(batch.loss_mask, batch.segment_ids, ratio_type=self.step_config.ratio_type)
        rows, total, bound = distributed.gather([batch.tokens.shape[0], count, segment_bound(batch.segment_ids)]).T
        rows, total, bound = rows.max(), total.sum(), bound.max()
        pad = rows - batch.tokens.shape[0]
        if pad:
            batch = TrainBatch(*(None if v is None else np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
                                 for v in batch))
        everyone = rows * jax.process_count()
        return Rows(batch, self.process_rows(everyone, jax.process_index()), int(everyone), float(max(total, 1)),
                    int(bound), local=True)

    def _global(self, shape: tuple, rows_of):
        """The global array of `shape` over the batch sharding, each device's block from `rows_of(index)` (its
        slices of the global array), built locally: with several processes a device_put of a host value compares it
        across them, a collective the others are not in."""
        return jax.make_array_from_callback(shape, self._batch_sharding, rows_of)

    def _micro_batches(self, part: Rows):
        mb = self._micro_rows(part.rows)
        fields = {k: v for k, v in part.batch._asdict().items() if v is not None}

        def put(v, start):  # the global [mb, ...] array of one field, from this process's rows of it
            def rows_of(index):  # a device's slice of the micro-batch: consecutive rows of this process's share
                first, stop, _ = index[0].indices(mb)
                at = int(np.searchsorted(part.index, start + first))
                return v[(slice(at, at + stop - first),) + tuple(index[1:])]

            return self._global((mb,) + v.shape[1:], rows_of)

        for start in range(0, part.rows, mb):
            yield {k: put(v, start) for k, v in fields.items()}

    def grads(self, batch: TrainBatch | Rows):
        """(loss, summed metrics, gradient w.r.t. the LoRA state) of the whole batch, accumulated over micro-batches."""
        part = self.share(batch, jax.process_index())
        total, scale = None, np.float32(part.loss_scale)
        with jax.set_mesh(self.mesh):
            for mb in self._micro_batches(part):
                teacher = self.teacher_lora() if self.step_config.full_vocab else None
                (loss, metrics), grads = self._grad(self.lora, self.rest, mb, scale, teacher,
                                                    max_segments=part.bound)
                weighted = {k: v * metrics[_WEIGHT.get(k, "num_loss_tokens")] if k not in _COUNTS else v
                            for k, v in metrics.items()}
                item = (loss, weighted, grads)
                total = item if total is None else self._add(total, item)
        return total

    def compiled_step(self, batch: TrainBatch | Rows) -> dict:
        """The programs a step on `batch` runs, compiled (not run): the gradient of one micro-batch ("grad") and the
        optimizer update ("apply"). Their `.as_text()` is the optimized HLO that ctxd_jax/hlo.py reads."""
        part = self.share(batch, jax.process_index())
        mb = next(self._micro_batches(part))
        with jax.set_mesh(self.mesh):
            teacher = self.teacher_lora() if self.step_config.full_vocab else None
            grad = self._grad.lower(self.lora, self.rest, mb, np.float32(part.loss_scale), teacher,
                                    max_segments=part.bound)
            grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated),
                                 self.lora)
            apply = self._apply.lower(self.lora, self.opt_state, grads, np.float32(0))
            return {"grad": grad.compile(), "apply": apply.compile()}

    def step(self, batch: TrainBatch | Rows) -> dict[str, float]:
        """One optimizer step on `batch`; returns float metrics (loss, grad_norm, lr, entropy, loss metrics, and
        nonfinite_skipped: 1 where a non-finite loss or gradient left the state as it was)."""
        lr = float(self.schedule(self.updates))
        loss, weighted, grads = self.grads(batch)
        self.lora, self.opt_state, grad_norm, ok = self._apply(self.lora, self.opt_state, grads, loss)
        self.lora = self._everywhere(self.lora)
        ok = bool(ok)
        if self.ema is not None and ok:
            self.ema = self._everywhere(ema_update(self.ema, self.lora, np.float32(self.step_config.ema_decay)))
        self.updates += ok
        weighted = {k: float(v) for k, v in jax.device_get(weighted).items()}
        out = {k: v / max(weighted[_WEIGHT.get(k, "num_loss_tokens")], 1.0)
               for k, v in weighted.items() if k not in _COUNTS}
        for key in ("teacher_kl", "teacher_seq_kl"):
            if key in out:
                # compute_loss reports mean(lpT - lp), the KL *reward*; log the KL itself (falls toward 0).
                out[key] = -out[key]
        n = max(weighted["num_loss_tokens"], 1.0)
        out.update(loss=float(loss), grad_norm=float(grad_norm), lr=lr, entropy=weighted["entropy_sum"] / n,
                   loss_tokens=weighted["num_loss_tokens"], nonfinite_skipped=float(not ok))
        return out

    def logprobs(self, batch: TrainBatch | Rows) -> np.ndarray:
        """Trainer log-probs [rows, seq_len] of the batch's tokens under the current weights (0 where undefined)."""
        out, part = [], self.share(batch, jax.process_index())
        with jax.set_mesh(self.mesh):
            for mb in self._micro_batches(part):
                rows = {k: mb[k] for k in ROW_KEYS}
                logprobs = score_rows_jit(self.lora, self.rest, rows, graphdef=self.graphdef,
                                          chunk_size=self.step_config.chunk_size,
                                          max_segments=part.bound)[0]
                out.append((distributed.local_rows if part.local else distributed.to_host)(logprobs))
        return np.concatenate(out)

    def model(self) -> nnx.Module:
        """The current model (shares arrays with the trainer; read-only use, e.g. save_adapter)."""
        return nnx.merge(self.graphdef, self.lora, self.rest)

    def state_arrays(self) -> dict:
        """What a checkpoint holds of the trainer (restore with load_state_arrays)."""
        out = {"lora": nnx.to_pure_dict(self.lora), "opt_state": self.opt_state,
               # A global array like the others, built locally (see _global).
               "updates": jax.make_array_from_callback((), self._replicated, lambda _: np.int32(self.updates))}
        if self.ema is not None:  # the EMA teacher: a resumed run teaches with the same average
            out["teacher_ema"] = nnx.to_pure_dict(self.ema)
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        self.lora = self._from_pure(arrays["lora"])
        self.opt_state, self.updates = arrays["opt_state"], int(arrays["updates"])
        if self.ema is not None:
            self.ema = self._from_pure(arrays["teacher_ema"])

    def _from_pure(self, pure: dict) -> nnx.State:
        lora = jax.tree.map(lambda x: x, self.lora)
        nnx.replace_by_pure_dict(lora, pure)
        return lora

    # ---- Scoring under another LoRA state (ctxd_jax/scoring.py): the teacher with LoRA off (the base model) and
    # behaviour log-probs under a snapshot. These read only `rest` (never donated) and the LoRA state passed in, so a
    # worker thread may call them between train steps without touching the train state.

    def snapshot_lora(self) -> nnx.State:
        """A copy of the current LoRA state in its own buffers: it outlives the train step, which donates
        self.lora. Score with it later (behaviour log-probs of this policy version)."""
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), self.lora)

    def base_lora(self) -> nnx.State:
        """A LoRA state of zeros (made once): every adapter then adds exactly 0, so the model is the base model."""
        if self._zero_lora is None:
            self._zero_lora = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self.lora)
        return self._zero_lora

    def teacher_lora(self) -> nnx.State:
        """The LoRA state the trainer's teacher runs with (StepConfig.teacher_lora): zeros (the base model), the
        current one, or the EMA."""
        mode = self.step_config.teacher_lora
        return self.base_lora() if mode == "off" else self.lora if mode == "live" else self.ema

    def score(self, seqs, *, lora: nnx.State, starts=None, temperatures=None, topk: int = 0,
              batch_tokens: int = SCORE_TOKENS_PER_DEVICE) -> list[Scores]:
        """Log-probs (and the top-k when topk > 0) of `seqs` at their tokens t >= starts[i], at temperatures[i]
        (defaults 1, 1), with the LoRA state `lora` (e.g. base_lora() or a snapshot_lora()). Rows are packed and
        sharded over the mesh like a train batch; `batch_tokens` tokens per device and call. With several processes
        each scores its own `seqs` on its devices' rows (they agree on the shapes and the number of calls)."""
        several = jax.process_count() > 1

        def run(rows):
            bound = segment_bound(rows["segment_ids"])
            if several:
                bound = int(distributed.gather(bound).max())
                rows = {k: jax.make_array_from_process_local_data(self._batch_sharding, v) for k, v in rows.items()}
            else:
                rows = {k: self._global(v.shape, v.__getitem__) for k, v in rows.items()}
            with jax.set_mesh(self.mesh):
                return score_rows_jit(lora, self.rest, rows, graphdef=self.graphdef,
                                      chunk_size=self.step_config.chunk_size, topk=topk, max_segments=bound)

        agree = (lambda values: distributed.gather(values).max(0).tolist()) if several else None
        mine = self.dp // jax.process_count()  # this process's devices along the batch
        return score_sequences(run, seqs, starts=starts, temperatures=temperatures, batch_tokens=batch_tokens * mine,
                               row_multiple=mine, fetch=distributed.local_rows, agree=agree)


def mismatch_kl(trainer_logprobs, sampling_logprobs, mask) -> float:
    """Mean over `mask` tokens of the k3 estimate r - log r - 1, r = exp(trainer - sampling)."""
    log_r = np.where(mask, np.asarray(trainer_logprobs, np.float64) - sampling_logprobs, 0.0)
    return float(np.sum(np.where(mask, np.exp(log_r) - log_r - 1.0, 0.0)) / max(int(np.sum(mask)), 1))
