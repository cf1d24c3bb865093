"""Turn a Mixture into tensors: on disk (`materialize`) or inside a live model for scoring (`Workbench`).

Both stream tensor by tensor and accumulate in float32, whatever the input dtypes. Non-float buffers (such as
`position_ids`) are copied from the reference candidate, never averaged. Peak memory does not grow with the number
of ingredients: one float32 accumulator and one input tensor are alive at a time, and each mixed tensor goes to
the output file as soon as it is made (never a whole shard in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from ..background import OneInFlight
from ..checkpoints.sources import SoupSources
from ..checkpoints.stream_writer import SafetensorsStreamWriter
from ..checkpoints.weights import BUFFER_DTYPES, SAFE_WEIGHTS_INDEX_NAME, averaged
from ..errors import ConfigError, IncompatibleCandidatesError
from ..mixture import Mixture
from ..progress import progress_bar
from .methods import method_tensor

logger = logging.getLogger(__name__)

# Entries converted to float32 at a time while mixing (1 MB): the converted block is still in cache when it is
# added, where converting a whole tensor first wrote it out and read it back (3x slower mixing at 1 B parameters).
MIX_BLOCK = 1 << 18


@dataclass
class MaterializeStats:
    """What `materialize` wrote, and the most tensor bytes it held at once."""

    files: list[str] = field(default_factory=list)
    tensor_sha256: dict[str, str] = field(default_factory=dict)
    peak_live_bytes: int = 0
    total_bytes: int = 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bfloat16 included)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()  # no copy of the tensor's bytes


def tensor_weights(mixture: Mixture, name: str) -> list[tuple[str, float]]:
    """The non-zero `(ingredient, weight)` pairs of one tensor; the base appears under its own id.

    A `per_tensor_weights` entry is the complete set of weights for its tensor; other tensors use the
    ingredients' weights plus the base's. Either way the pairs come in the ingredients' order, then the base: the
    float32 sum, and so every written bit, does not depend on how a dict was ordered (`soup.json` sorts keys).
    """
    if mixture.per_tensor_weights and name in mixture.per_tensor_weights:
        weights = mixture.per_tensor_weights[name]
        order = [*mixture.ids(), *([mixture.base.id] if mixture.base else [])]
        order += sorted(cid for cid in weights if cid not in order)
        return [(cid, weights[cid]) for cid in order if weights.get(cid, 0) != 0]
    pairs = [(cid, w) for cid, w in mixture.weights().items() if w != 0]
    if mixture.base is not None and mixture.base.weight != 0:
        pairs.append((mixture.base.id, mixture.base.weight))
    return pairs


def _copied(mixture: Mixture, sources: SoupSources, name: str) -> torch.Tensor:
    """A non-float tensor (position ids, BatchNorm's num_batches_tracked), copied, never averaged, from the
    reference candidate: a rule that never depends on how the candidates rank."""
    dtype = sources.reference.dtype(name)
    copied = sources.reference.get(name).clone()
    if dtype in BUFFER_DTYPES:
        return copied
    for cid in mixture.ids():  # packed or quantized data (uint32, float8): only identical copies soup
        if not torch.equal(sources.read(cid, name).view(torch.uint8), copied.view(torch.uint8)):
            raise IncompatibleCandidatesError(
                f"Tensor {name} is stored as {dtype} (packed or quantized data), which cannot be averaged, "
                f"and {cid} differs from {sources.reference_id} there. Dequantize the candidates to float weights "
                "(e.g. save them in bfloat16) and soup those."
            )
    return copied


def mix_tensor(mixture: Mixture, sources: SoupSources, name: str) -> tuple[torch.Tensor, int]:
    """The mixed value of one tensor in float32 (or copied, if not float), and the bytes held to make it."""
    if not averaged(sources.reference.dtype(name)):
        copied = _copied(mixture, sources, name)
        return copied, _nbytes(copied)
    if mixture.method is not None and (made := method_tensor(mixture, sources, name)) is not None:
        return made
    pairs = tensor_weights(mixture, name)
    if not pairs:
        raise ConfigError(f"The mixture gives every ingredient weight 0 for {name}; nothing to average.")
    first = sources.read(pairs[0][0], name)
    accumulator = torch.empty(
        first.shape, dtype=torch.float32
    )  # a new float32 tensor, whatever the input dtype
    scratch = torch.empty(min(MIX_BLOCK, first.numel()), dtype=torch.float32)
    _add_in_blocks(accumulator, first, pairs[0][1], scratch, start=True)
    live = _nbytes(accumulator) + _nbytes(first) + _nbytes(scratch)
    del first
    for cid, weight in pairs[1:]:
        tensor = sources.read(cid, name)
        live = max(live, _nbytes(accumulator) + _nbytes(tensor) + _nbytes(scratch))
        _add_in_blocks(accumulator, tensor, weight, scratch)
        del tensor
    _reweight_missing_rows(accumulator, sources, name, pairs)
    return accumulator, live


def _add_in_blocks(
    accumulator: torch.Tensor, tensor: torch.Tensor, weight: float, scratch: torch.Tensor, start: bool = False
) -> None:
    """`accumulator += weight · tensor` (`= weight · tensor` when `start`), converted to float32 `MIX_BLOCK`
    entries at a time in `scratch`: the same float32 operations, in the same order, as converting it whole."""
    total, values = accumulator.view(-1), tensor.reshape(-1)
    for begin in range(0, total.numel(), MIX_BLOCK):
        end = min(begin + MIX_BLOCK, total.numel())
        block = scratch[: end - begin].copy_(values[begin:end])
        if start:
            torch.mul(block, weight, out=total[begin:end])
        else:
            total[begin:end].add_(block, alpha=weight)


def _reweight_missing_rows(accumulator: torch.Tensor, sources: SoupSources, name: str, pairs) -> None:
    """Vocabulary rows some ingredients lack (read as zeros) become the weighted mean of those that have them;
    a row none has keeps the base's value. Rows every ingredient has are left exactly as summed."""
    missing = {cid: rows for cid, _ in pairs if (rows := sources.missing_rows(cid, name)) is not None}
    if not missing:
        return
    total, present = 0.0, torch.zeros(accumulator.shape[0], dtype=torch.float64)
    for cid, weight in pairs:  # the same additions, in the same order, for every row: equal sums stay equal
        total += weight
        present += weight * (~missing[cid]).double() if cid in missing else weight
    partial = (present != total) & (present != 0)
    accumulator[partial] *= (total / present[partial]).to(torch.float32).unsqueeze(1)
    nobody = present == 0
    if bool(nobody.any()):
        accumulator[nobody] = sources.read_base(name)[nobody].to(torch.float32) * total


def soup_dtype(sources: SoupSources, requested: str = "auto") -> torch.dtype:
    """The dtype the soup is written (and scored) in: `requested`, or with `"auto"` the candidates' common float
    dtype, float32 when they disagree. Read from the tensor headers: no data is touched."""
    if requested != "auto":
        return getattr(torch, requested)
    dtypes = {
        reader.dtype(name)
        for reader in sources.candidates.values()
        for name in reader.keys()
        if averaged(reader.dtype(name))
    }
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def plan_output(
    sources: SoupSources, dtype: torch.dtype | None = None, extra: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The soup's tensors as `meta` tensors: names, shapes and output dtypes, with no data; `extra` tensors that
    no candidate supplies (a backbone soup's head) come after them."""
    reference = sources.reference
    dtype = dtype or soup_dtype(sources)
    planned = {
        name: torch.empty(
            sources.output_shape(name),
            dtype=dtype if averaged(reference.dtype(name)) else reference.dtype(name),
            device="meta",
        )
        for name in reference.keys()
    }
    for name, tensor in (extra or {}).items():
        if name not in planned:
            planned[name] = torch.empty(
                tensor.shape, dtype=dtype if averaged(tensor.dtype) else tensor.dtype, device="meta"
            )
    return planned


def shard_plan(planned: dict[str, torch.Tensor], max_shard_size: int | str):
    """huggingface_hub's shard plan (`model-0000i-of-0000N.safetensors`) for the planned `meta` tensors.

    Its torch front end (`split_torch_state_dict_into_shards`) probes each tensor for `DTensor`, importing
    `torch.distributed.tensor` (about a second); `meta` tensors share no storage, so their sizes are all it needs.
    """
    return split_state_dict_into_shards_factory(
        planned,
        get_storage_size=_nbytes,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )


def output_bytes(planned: dict[str, torch.Tensor]) -> int:
    return sum(_nbytes(t) for t in planned.values())


def materialize(
    mixture: Mixture,
    sources: SoupSources,
    output_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    quiet: bool = False,
    overrides: dict[str, torch.Tensor] | None = None,
    observe=None,
) -> MaterializeStats:
    """Write the soup's weights to `output_dir` as (sharded) safetensors, tensor by tensor.

    Args:
        mixture (`Mixture`): what to average.
        sources (`SoupSources`): open weights of the base and each ingredient, aligned.
        output_dir (`Path`): an existing folder.
        dtype (`torch.dtype`, *optional*): output dtype of float tensors; defaults to `soup_dtype` (the
            candidates' common dtype, float32 when they disagree).
        max_shard_size (`str` or `int`, *optional*, defaults to `"5GB"`, the Hub's convention): the largest shard.
        overrides (`dict[str, torch.Tensor]`, *optional*): tensors written as given instead of mixed (BatchNorm
            statistics re-estimated on data after averaging; a backbone soup's head, which no candidate has).
        observe (`Callable[[str, SoupSources], None]`, *optional*): called with each tensor's name and sources
            that hold what they read (`SoupSources.held`) before it is mixed from the same reads: the single pass
            verifies the inputs this way while they are merged (`single_pass.py`). Memory then holds one tensor
            of every input at a time, instead of one tensor of one input.
    """
    overrides = overrides or {}
    planned = plan_output(sources, dtype, overrides)
    names = list(planned)
    split = shard_plan(planned, max_shard_size)
    stats = MaterializeStats()
    with (
        progress_bar(total=len(names), desc="Materializing soup", unit="tensor", quiet=quiet) as bar,
        _Handoff(stats) as handoff,
    ):
        for filename, shard_names in split.filename_to_tensors.items():
            # Each tensor goes to disk as soon as it is mixed: memory holds one tensor, never a whole shard.
            shard = {name: planned[name] for name in shard_names}
            with SafetensorsStreamWriter(output_dir / filename, shard, metadata={"format": "pt"}) as writer:
                for name in writer.order:
                    mixed, live = _mixed(mixture, sources, name, overrides, observe)
                    out = mixed.to(planned[name].dtype).contiguous()
                    del mixed
                    handoff.submit(writer, name, out, live)
                    del out
                    bar.update(1)
                handoff.wait()
            stats.files.append(filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        stats.files.append(SAFE_WEIGHTS_INDEX_NAME)
    return stats


def _mixed(mixture: Mixture, sources: SoupSources, name: str, overrides: dict, observe):
    """One tensor of the soup, and the bytes held to make it; with `observe`, from reads it saw first."""
    if name in overrides:
        return overrides[name].detach().cpu(), 0
    if observe is None:
        return mix_tensor(mixture, sources, name)
    held = sources.held()
    observe(name, held)
    return mix_tensor(mixture, held, name)


class _Handoff(OneInFlight):
    """Hashes and writes each mixed tensor on one background thread (hashlib and file writes release the GIL),
    so the next tensor is mixed meanwhile. At most one tensor waits to be written: memory holds two output
    tensors at a time, and they are written in order."""

    def __init__(self, stats: MaterializeStats):
        super().__init__()
        self.stats = stats
        self._pending_bytes = 0

    def submit(self, writer: SafetensorsStreamWriter, name: str, out: torch.Tensor, live: int) -> None:
        self.stats.peak_live_bytes = max(
            self.stats.peak_live_bytes, live + _nbytes(out) + self._pending_bytes
        )
        super().submit(self._write, writer, name, out)
        self._pending_bytes = _nbytes(out)

    def _write(self, writer: SafetensorsStreamWriter, name: str, out: torch.Tensor) -> None:
        self.stats.tensor_sha256[name] = tensor_sha256(out)
        writer.write(name, out)
        self.stats.total_bytes += _nbytes(out)

    def wait(self) -> None:
        """Until the tensor in flight is written (its error, if any, raised here)."""
        super().wait()
        self._pending_bytes = 0


class Workbench:
    """A live model whose weights are set to a mixture before each evaluation.

    Every trial's weights are mixed from its ingredients by `mix_tensor` (float32 accumulation), tensor by tensor,
    and copied into the model's parameters in the model's dtype: no running sum over trials and no state dict per
    trial, so a trial is scored with exactly the tensors `materialize` would write.

    Args:
        model (`torch.nn.Module`): a model of the candidates' architecture, in the soup's dtype.
        sources (`SoupSources`): open weights of the base and the candidates, aligned.
        after_load (`Callable`, *optional*): called with the model after each mixture of two or more models is
            loaded (BatchNorm recalibration); a single candidate is scored exactly as it was fine-tuned.
    """

    def __init__(self, model: torch.nn.Module, sources: SoupSources, after_load=None):
        self.model = model
        self.after_load = after_load
        self.sources = sources
        state = model.state_dict()
        self.names = [n for n in sources.reference.keys() if averaged(sources.reference.dtype(n))]
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ConfigError(
                f"The model class does not have the checkpoint's tensor {missing[0]}; "
                "make sure config.json's `architectures` names the class the weights were saved from."
            )
        self.shapes = {n: state[n].shape for n in self.names}
        self.loaded: Mixture | None = None

    def _targets(self) -> dict[str, torch.Tensor]:
        """The model's tensors, looked up afresh: moving the model (`.to(device)`) replaces them."""
        state = self.model.state_dict()
        return {n: state[n] for n in self.names}

    @torch.no_grad()
    def load(self, mixture: Mixture) -> None:
        """Write `mixture`'s weights into the model's parameters, exactly as `materialize` would write them.

        Every mixture is built from its ingredients by the same `mix_tensor` as the written soup (no running sum
        that adds and subtracts trial members): a single candidate is scored as itself, bit for bit, and a soup
        is scored with the tensors that are written, whatever the order of the trials before it.
        """
        targets = self._targets()
        for name in self.names:
            mixed, _ = mix_tensor(mixture, self.sources, name)
            targets[name].copy_(mixed)
        blended = (
            sum(w != 0 for w in mixture.weights().values()) + bool(mixture.base and mixture.base.weight) > 1
        )
        if self.after_load is not None and (blended or mixture.per_tensor_weights):
            self.after_load(self.model)
        self.loaded = mixture
