"""A Trainer-free structured pruner: what one pruning step needs besides the schedule and the training loop.

:class:`Pruner` keeps the unpruned network's reference (MACs, params, channels, layer widths and, for ``target:
latency``, the latency model of the deployment runtime), accumulates gradients for Taylor importance, plans a step
that removes a fraction of the reference, and measures the network after it. The plan is plain data, applied with
:func:`~lightning_segcompress.pruning.state.prune_with_history` (on every DDP rank alike). Torch-Pruning's split,
one level up: :mod:`~lightning_segcompress.pruning.graph` (dependencies), :mod:`~lightning_segcompress.pruning.
importance`, :mod:`~lightning_segcompress.pruning.search` (one step), this module (a pruning run).

Example (prune 30 % of the MACs of a bare network, no Lightning)::

    pruner = Pruner(target="macs", importance="l2")
    example = torch.randn(1, 3, 64, 64)
    pruner.begin(network, example)
    history, plan = pruner.plan(network, example, fraction=0.3)
    prune_with_history(network, history, example)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_segcompress.benchmark.runtime_timer import RuntimeTimer, check_runtime
from lightning_segcompress.benchmark.runtimes import canonical_name
from lightning_segcompress.pruning.graph import PruningError, layer_widths, measure, unused_layers
from lightning_segcompress.pruning.importance import IMPORTANCE_NAMES, build_importance, resolve_importance_class
from lightning_segcompress.pruning.latency import KeepBest, model_group_costs, weights_from_costs
from lightning_segcompress.pruning.latency_model import RUNTIMES, LatencyModel, build_latency_model
from lightning_segcompress.pruning.search import TARGETS, PruningConfig, plan_step
from lightning_segcompress.utils.inspection import find_classifier_layers


class Pruner:
    """Plans structured pruning steps against the unpruned network's reference.

    Args:
        target: ``"macs"``, ``"params"``, ``"channels"`` or ``"latency"`` (ms on ``runtime``).
        importance, importance_args: a name of :data:`~lightning_segcompress.pruning.IMPORTANCE_NAMES` or a
            torch-pruning ``Importance`` class path, and its arguments. ``"taylor"`` needs
            :meth:`accumulate_gradients` before :meth:`plan`.
        global_pruning, round_to, max_layer_fraction, rel_tolerance: as in :class:`PruningConfig`.
        seed: seeds the plan of step ``k`` with ``seed + k`` (``random`` importance, the same on every rank).
        runtime, threads, latency_ranking: ``target: latency`` only: where the latency model is measured, on how many
            threads, and whether groups are also ranked by their measured cost.
        log: where progress messages go (the callback passes rank-zero logging).
    """

    def __init__(self, target: str = "macs", importance: str = "l2", importance_args: dict[str, Any] | None = None,
                 global_pruning: bool = True, round_to: int | None = 8, max_layer_fraction: float = 0.9,
                 rel_tolerance: float = 0.03, seed: int = 0, runtime: str = "executorch", threads: int | None = None,
                 latency_ranking: bool = False, log: Callable[[str], None] = print) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}.")
        try:
            runtime = canonical_name(runtime)
        except ValueError:
            raise ValueError(f"runtime (where target: latency is measured) must be one of {list(RUNTIMES)}, got "
                             f"{runtime!r}.") from None
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {threads}.")
        if target == "latency":
            check_runtime(runtime)  # ExecuTorch missing: fails now, with the install command
        if importance not in IMPORTANCE_NAMES:
            resolve_importance_class(importance)  # fails now, with the fix, rather than at the first step
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1 (or null for no rounding), got {round_to}.")
        if not 0.0 < max_layer_fraction < 1.0:
            raise ValueError(f"max_layer_fraction must be in (0, 1), got {max_layer_fraction}.")
        if not 0.0 < rel_tolerance < 1.0:
            raise ValueError(f"rel_tolerance is relative to amount and must be in (0, 1), got {rel_tolerance}.")
        self.target = target
        self.importance = importance
        self.importance_args = dict(importance_args or {})
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.max_layer_fraction = max_layer_fraction
        self.rel_tolerance = rel_tolerance
        self.seed = seed
        self.runtime = runtime
        self.threads = threads
        self.latency_ranking = latency_ranking
        self.log = log
        self.reference: dict[str, Any] | None = None  # the unpruned network's measures
        self.reference_widths: dict[str, int] | None = None  # its output channels per layer
        self.latency_model: LatencyModel | None = None  # target latency: built before the first plan
        self.latency_timer = None  # how latency is timed (None: a RuntimeTimer on runtime/threads)
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_batches = 0

    # ---- the reference -----------------------------------------------------------------------------------

    def begin(self, network: nn.Module, example: torch.Tensor) -> None:
        """Measure the unpruned network once (later calls keep the first reference)."""
        if self.reference is None:
            self.reference = measure(network, example)
            self.reference_widths = layer_widths(network)
        if self.latency_model is not None:  # from a checkpoint, or assigned before the first step
            self.reference.setdefault("latency", self.latency_model.reference_ms)

    def set_latency_model(self, model: LatencyModel) -> None:
        self.latency_model = model
        if self.reference is not None:
            self.reference["latency"] = model.reference_ms

    def state(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_widths": self.reference_widths,
                "latency_model": self.latency_model.as_dict() if self.latency_model is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference")
        self.reference_widths = state.get("reference_widths")
        if state.get("latency_model"):
            self.latency_model = LatencyModel.from_dict(state["latency_model"])

    # ---- Taylor importance -----------------------------------------------------------------------------------

    @property
    def gradient_batches(self) -> int:
        return self._grad_batches

    def accumulate_gradients(self, network: nn.Module) -> None:
        """Add the network's current ``.grad`` to the sums Taylor importance scores with."""
        for name, p in network.named_parameters():
            if p.grad is not None:
                grad = p.grad.detach()
                self._grad_sum[name] = self._grad_sum[name] + grad if name in self._grad_sum else grad.clone()
        self._grad_batches += 1

    def clear_gradients(self) -> None:
        self._grad_sum, self._grad_batches = {}, 0

    @contextlib.contextmanager
    def _taylor_gradients(self, network: nn.Module) -> Iterator[None]:
        """Install the mean of the accumulated gradients as ``.grad`` while Taylor importance is scored."""
        if self.importance != "taylor":
            yield
            return
        if not self._grad_sum:
            raise PruningError("taylor importance has no gradients: no optimizer step ran in this epoch before "
                               "the pruning step. Use another importance or give the epoch training batches.")
        saved = {}
        for name, p in network.named_parameters():
            saved[name] = p.grad
            summed = self._grad_sum.get(name)
            p.grad = summed / self._grad_batches if summed is not None else torch.zeros_like(p)
        try:
            yield
        finally:
            for name, p in network.named_parameters():
                p.grad = saved.get(name)
            self.clear_gradients()

    # ---- one step ----------------------------------------------------------------------------------------

    def config(self, network: nn.Module, example: torch.Tensor, ignored_layers: Sequence[str] = ()) -> PruningConfig:
        """The step's configuration: ``ignored_layers`` and the network's classifier layers are left alone."""
        return PruningConfig(ignored_layers=sorted(set(ignored_layers) | set(find_classifier_layers(network, example))),
                             round_to=self.round_to, global_pruning=self.global_pruning,
                             max_layer_fraction=self.max_layer_fraction, reference_widths=self.reference_widths,
                             tolerance=self.rel_tolerance)

    def plan(self, network: nn.Module, example: torch.Tensor, fraction: float, ignored_layers: Sequence[str] = (),
             step: int = 1, exact: bool = True) -> tuple[list, dict]:
        """Plan removing ``fraction`` of the reference's ``target``: the plain-data history and a summary. With
        ``exact`` (a schedule's last step), a plan outside ``rel_tolerance`` raises :class:`PruningError` naming the
        fix. The network is left as it was."""
        self.begin(network, example)
        config = self.config(network, example, ignored_layers)
        if self.target == "latency" and self.latency_model is None:
            self._build_latency_model(network, example, config)
        importance, weights = build_importance(self.importance, **self.importance_args), None
        if self.target == "latency" and self.latency_ranking:
            costs = model_group_costs(self.latency_model, network, example, config.ignored_layers,
                                      round_to=self.round_to)
            importance, weights = KeepBest(importance, min_channels=self.round_to or 8), weights_from_costs(costs)
        with self._taylor_gradients(network), _seeded(self.seed + step):
            plan = plan_step(network, example, importance, self.target, fraction, self.reference[self.target],
                             config, group_weights=weights, latency_model=self.latency_model)
        if exact and not plan.within_tolerance:
            raise PruningError(self._tolerance_message(network, example, plan, fraction))
        return plan.history, plan.as_dict()

    def _tolerance_message(self, network: nn.Module, example: torch.Tensor, plan, fraction: float) -> str:
        message = (f"the closest plan removes {plan.achieved_fraction:.3f} of {self.target}, not {fraction:.3f} "
                   f"(rel_tolerance {self.rel_tolerance:.0%}). Lower round_to, raise max_layer_fraction, un-ignore "
                   "layers or raise rel_tolerance.")
        if self.target == "latency":
            model = self.latency_model
            message += (f" Of the {model.reference_ms:.1f} ms on {model.runtime}, {model.constant_ms:.1f} ms are "
                        "outside the prunable layers (transposes, resizes, the classifier, untimed layers) and do "
                        "not shrink.")
        unused = unused_layers(network, example) if self.target == "params" else {}
        if unused:
            message += (f" Note: {sum(unused.values()):,} parameters sit in layers the forward never runs "
                        f"({', '.join(list(unused)[:4])}); they count as params but cannot be pruned: delete "
                        "them from the network or target macs.")
        return message

    def _timer(self):
        return self.latency_timer if self.latency_timer is not None else RuntimeTimer(self.runtime, self.threads)

    def _build_latency_model(self, network: nn.Module, example: torch.Tensor, config: PruningConfig) -> None:
        """Time the unpruned network's prunable layers on the runtime (before the first step)."""
        self.log(f"StructuredPruning: timing the network's layers on {self.runtime} at {list(example.shape)} for "
                 "target latency (once; kept in checkpoints)...")
        model = build_latency_model(network, example, self.runtime, ignored_layers=config.ignored_layers,
                                    round_to=self.round_to, timer=self._timer())
        self.log(f"StructuredPruning: latency model built in {model.build_s:.0f} s ({model.timings} layer timings): "
                 f"{model.reference_ms:.1f} ms measured = {model.scale:.2f} x the {len(model.layers)} modelled "
                 f"layers + {model.constant_ms:.1f} ms.")
        self.set_latency_model(model)

    # ---- after a step ----------------------------------------------------------------------------------------

    def measure(self, network: nn.Module, example: torch.Tensor, time_it: bool = True) -> tuple[dict, dict]:
        """The network's measures (with ``latency`` predicted where there is a latency model) and, for ``target:
        latency``, the latency record: predicted and (``time_it``) measured ms on the runtime."""
        after = measure(network, example)
        if self.latency_model is None or "latency" not in (self.reference or {}):
            return after, {}
        after["latency"] = self.latency_model.predict(network)
        measured, error = self._measured_ms(network, example) if time_it else (None, None)
        reference = self.latency_model.reference_ms
        latency = {"runtime": self.latency_model.runtime, "threads": self.latency_model.threads,
                   "reference_ms": reference, "predicted_ms": after["latency"], "measured_ms": measured,
                   "measured_fraction": None if measured is None else 1.0 - measured / reference}
        if error:
            latency["measured_error"] = error
        return after, latency

    def step_record(self, network: nn.Module, example: torch.Tensor, plan: dict, time_it: bool = True) -> dict:
        """What a step did, as plain data: ``plan`` (:meth:`plan`'s summary, with ``groups_planned`` and
        ``groups_applied``), the network's measures and the fraction of each kept, latency, widths per layer."""
        after, latency = self.measure(network, example, time_it)
        return {"requested_fraction": plan["requested_fraction"],
                "achieved_fraction": 1.0 - after[self.target] / self.reference[self.target],
                "planned_fraction": plan["achieved_fraction"], "channel_ratio": plan["ratio"],
                "groups_planned": plan["groups_planned"], "groups_applied": plan["groups_applied"], **after,
                **{f"{k}_fraction_kept": after[k] / self.reference[k] for k in after}, **latency,
                "channels_per_layer": layer_widths(network)}

    def _measured_ms(self, network: nn.Module, example: torch.Tensor) -> tuple[float | None, str | None]:
        """The pruned network's latency measured once on the runtime; a failure is reported, not raised."""
        try:
            return float(self._timer().time_network(network, example)), None
        except Exception as err:  # noqa: BLE001 - the step is done; only the check is missing
            return None, f"{type(err).__name__}: {str(err)[:300]}"


def describe_step(record: dict, target: str) -> str:
    """One line about a :meth:`Pruner.step_record`."""
    text = (f"removed {record['achieved_fraction']:.3f} of {target} (requested {record['requested_fraction']:.3f}); "
            f"params {record['params']:,} ({record['params_fraction_kept']:.2f} kept), MACs {record['macs']:,} "
            f"({record['macs_fraction_kept']:.2f} kept).")
    if record.get("predicted_ms") is not None:
        measured = (f"{record['measured_ms']:.1f} ms measured" if record["measured_ms"] is not None
                    else f"not measured ({record.get('measured_error')})")
        text += (f" Latency on {record['runtime']}: {record['predicted_ms']:.1f} ms predicted, {measured} (unpruned "
                 f"{record['reference_ms']:.1f} ms).")
    return text


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
