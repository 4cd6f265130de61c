"""Configuration: models (backend, sampling defaults, placement, scaling, cost) and pipelines.

A config is YAML validated by pydantic. Every cross reference (a model named in a
layer, the aggregator, the judge) is checked at load time, so a typo fails before
Ray starts, with a message that names the offending field.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema

from moa_ray.backends import registry as backend_registry
from moa_ray.errors import ConfigError

PRESET_PACKAGE = "moa_ray.presets"
DEFAULT_PIPELINE = "embedded"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- models


class Autoscaling(_Strict):
    """Ray Serve autoscaling of one model's deployment."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def to_serve(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict Ray Serve expects."""
        return self.model_dump(exclude_none=True)


class Pricing(_Strict):
    """USD per million tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelSpecBase(_Strict):
    """What every backend shares: sampling defaults, placement, scaling and cost facts."""

    model: str = Field(min_length=1, description="Provider model id, GGUF path or packaged alias.")
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1)
    # placement
    num_cpus: float | None = Field(default=None, ge=0, description="CPUs per replica; default depends on the backend.")
    num_gpus: float = Field(default=0, ge=0)
    pool: str | None = Field(default=None, description="Custom Ray resource naming this model's node pool.")
    resources: dict[str, float] = Field(default_factory=dict)
    label_selector: dict[str, str] = Field(default_factory=dict)
    # scaling
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(default=16, ge=1)
    # cost accounting
    parameters_b: float | None = Field(default=None, gt=0, description="Parameters in billions, for TFLOPs estimates.")
    pricing: Pricing | None = None
    # operations
    rpm: int | None = Field(
        default=None,
        ge=1,
        description="Calls per minute this model may get, across every process of the application (ingress replicas, "
        "eval workers): a call waits for room while its request's deadline allows (moa_ray.pipeline.limits).",
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute (prompt + completion) this model may get, across every process: a call reserves "
        "its prompt's estimated tokens plus its max_tokens, and keeps what the provider reports it used.",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models of this config that a failed call is made again on, in order (each falling back on its own "
        "fallbacks first); both calls are traced.",
    )

    default_num_cpus: ClassVar[float] = 1.0
    #: Fields that decide where and how fast a model runs, never what it answers; every other field of a
    #: spec is an answer setting (see :meth:`answer_settings`), so a new field counts unless listed here.
    operational_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "num_cpus",
            "num_gpus",
            "pool",
            "resources",
            "label_selector",
            "num_replicas",
            "autoscaling",
            "max_ongoing_requests",
            "parameters_b",
            "pricing",
            "rpm",
            "tpm",
            "fallbacks",
        }
    )

    @property
    def deployed(self) -> bool:
        """Whether the model runs as its own Ray Serve deployment (every model that holds weights does)."""
        return True

    @property
    def rate_limited(self) -> bool:
        """Whether calls to this model are held to an ``rpm`` or ``tpm``."""
        return self.rpm is not None or self.tpm is not None

    def answer_settings(self) -> dict[str, Any]:
        """Every setting that can change this model's answers (what resuming an evaluation must keep)."""
        return self.model_dump(mode="json", exclude=set(self.operational_fields))

    def ray_actor_options(self) -> dict[str, Any]:
        """``ray_actor_options`` for this model's Serve deployment."""
        num_cpus = self.num_cpus if self.num_cpus is not None else self.default_num_cpus
        opts: dict[str, Any] = {"num_cpus": num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        res = dict(self.resources)
        if self.pool:
            res.setdefault(self.pool, 1.0)
        if res:
            opts["resources"] = res
        if self.label_selector:
            opts["label_selector"] = dict(self.label_selector)
        return opts

    def deployment_options(self) -> dict[str, Any]:
        """Options for ``Deployment.options`` (replicas or autoscaling, concurrency, placement)."""
        return serve_deployment_options(self.ray_actor_options(), self.max_ongoing_requests, self.autoscaling, self.num_replicas)


def serve_deployment_options(
    ray_actor_options: dict[str, Any], max_ongoing_requests: int, autoscaling: Autoscaling | None, num_replicas: int
) -> dict[str, Any]:
    opts: dict[str, Any] = {"ray_actor_options": ray_actor_options, "max_ongoing_requests": max_ongoing_requests}
    if autoscaling is not None:
        opts["autoscaling_config"] = autoscaling.to_serve()
    else:
        opts["num_replicas"] = num_replicas
    return opts


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "tgp_", "xai-", "AIza", "key-", "pk_", "rk_")


def _looks_like_key(value: str) -> bool:
    """Provider keys have known prefixes, or are long runs of letters and digits without underscores."""
    if value.startswith(_KEY_PREFIXES):
        return True
    return len(value) >= 24 and "_" not in value and any(c.isdigit() for c in value)


class Timeouts(_Strict):
    connect_s: float = Field(default=10.0, gt=0)
    read_s: float = Field(default=120.0, gt=0)
    retry_read: bool = Field(
        default=False,
        description="Retry an attempt that got no answer within read_s (a stream: no first token). Off: a provider "
        "that holds a call that long is down or overloaded, and each retry would hold the request read_s more.",
    )


class RemoteModelSpec(ModelSpecBase):
    """A model behind a network API: it holds no weights here, so it is called in process unless it asks for a
    deployment of its own. The base of :class:`OpenAIModelSpec`, and of a plugin backend's spec for a remote service."""

    hosting: Literal["in_process", "deployment"] = Field(
        default="in_process",
        description="in_process: called from the process that runs the pipeline (the CLI, each eval worker, the "
        "ingress), through one pooled client per process, with max_ongoing_requests x replicas as its concurrency cap "
        "there: a remote model holds no weights, so a replica of its own only adds a hop. deployment: its own Ray Serve "
        "deployment (placement, replicas and autoscaling apply, one cap for every caller).",
    )
    default_num_cpus: ClassVar[float] = 0.05
    operational_fields: ClassVar[frozenset[str]] = ModelSpecBase.operational_fields | {"hosting"}

    @model_validator(mode="after")
    def _placement_needs_a_deployment(self) -> RemoteModelSpec:
        if self.hosting == "in_process":
            placed = [f for f in ("pool", "resources", "label_selector", "autoscaling", "num_gpus") if getattr(self, f)]
            if placed:
                raise ValueError(f"{', '.join(placed)} place a deployment: set hosting: deployment to give this model one")
        return self

    @property
    def deployed(self) -> bool:
        return self.hosting == "deployment"

    def concurrency_cap(self) -> int:
        """Calls in flight at once: what its deployment's replicas would take (per calling process when in process)."""
        replicas = self.autoscaling.max_replicas if self.autoscaling else self.num_replicas
        return self.max_ongoing_requests * replicas


class OpenAIModelSpec(RemoteModelSpec):
    """Any OpenAI-compatible chat endpoint (vLLM, Together, Ollama, OpenAI...)."""

    backend: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    timeout: Timeouts = Field(default_factory=Timeouts)
    max_retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=0.5, gt=0, description="First backoff; grows exponentially with full jitter.")
    backoff_max_s: float = Field(default=20.0, gt=0)
    max_connections: int = Field(default=64, ge=1)
    http_transport: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="The connection layer under the httpx client: aiohttp's (httpx-aiohttp, as the openai SDK's "
        "DefaultAioHttpClient) spends about half of httpx's own CPU per call, a third when streaming; httpx: its own "
        "transport (HTTP/1.1 only either way).",
    )
    operational_fields: ClassVar[frozenset[str]] = RemoteModelSpec.operational_fields | {
        "base_url",
        "api_key_env",
        "timeout",
        "max_retries",
        "backoff_s",
        "backoff_max_s",
        "max_connections",
        "http_transport",
    }

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and (not _ENV_NAME.fullmatch(v) or _looks_like_key(v)):
            # never echo the value: it may be the secret itself
            raise ValueError("api_key_env must be the NAME of an environment variable (e.g. TOGETHER_API_KEY), not a key")
        return v


class LlamaCppModelSpec(ModelSpecBase):
    """A GGUF model run in-process by llama.cpp (the embedded default)."""

    backend: Literal["llamacpp"]
    n_threads: int | None = Field(default=None, ge=1)
    n_ctx: int = Field(default=4096, ge=256)
    seed: int = -1
    chat_format: str | None = None
    logits_all: bool = Field(
        default=False,
        description="Keep the logits of every position so calls can return token logprobs (llama.cpp needs it; "
        "costs n_ctx x vocabulary floats of memory). Off: logprobs are not asked for and callers use the text.",
    )
    max_ongoing_requests: int = Field(default=64, ge=1)
    operational_fields: ClassVar[frozenset[str]] = ModelSpecBase.operational_fields | {"n_threads", "logits_all"}


#: Engine arguments that have a field of their own (``engine_kwargs`` may not set them).
_VLLM_FIELDS = {
    "model": "model",
    "served_model_name": "the config's model name",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "enable_prefix_caching": "enable_prefix_caching",
    "enforce_eager": "enforce_eager",
}
PlacementStrategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


class VLLMModelSpec(ModelSpecBase):
    """A model served by vLLM as a Ray Serve LLM deployment (``ray.serve.llm``; built in :mod:`moa_ray.serve.llm`).

    ``model`` is a Hugging Face Hub id, a local Hugging Face folder, or a packaged alias
    (``smollm2-135m-instruct``: its folder is made from the packaged GGUF on first use).
    GPUs come from the parallelism: one per tensor x pipeline rank, each in its own
    placement-group bundle; ``device: cpu`` runs vLLM's CPU build instead.
    """

    backend: Literal["vllm"]
    device: Literal["gpu", "cpu"] = Field(default="gpu", description="cpu: vLLM's CPU build (float32, no GPU).")
    accelerator_type: str | None = Field(default=None, description="Ray accelerator type the replicas need, e.g. A100, H100, L4.")
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=256)
    dtype: str = "auto"
    enable_prefix_caching: bool | None = Field(default=None, description="vLLM's automatic prefix caching (None: vLLM's default, on).")
    enforce_eager: bool = Field(default=False, description="No CUDA graphs / torch.compile: slower steps, much faster start.")
    kv_cache_space_gib: float | None = Field(default=None, gt=0, description="device: cpu only: KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Any other vLLM engine argument.")
    placement_group_bundles: list[dict[str, float]] | None = Field(
        default=None, description="One bundle per engine worker (default: one GPU, or one CPU, per tensor x pipeline rank)."
    )
    placement_strategy: PlacementStrategy = "PACK"
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the replica and its engine workers.")
    num_gpus: float = Field(default=0, ge=0, description="Derived: tensor_parallel_size x pipeline_parallel_size on GPUs.")
    max_ongoing_requests: int = Field(default=64, ge=1)
    operational_fields: ClassVar[frozenset[str]] = ModelSpecBase.operational_fields | {
        "accelerator_type",
        "gpu_memory_utilization",
        "kv_cache_space_gib",
        "placement_group_bundles",
        "placement_strategy",
    }

    @property
    def num_workers(self) -> int:
        """Engine workers (tensor x pipeline ranks), each in its own bundle."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _consistent(self) -> VLLMModelSpec:
        devices = self.num_workers if self.device == "gpu" else 0
        if "num_gpus" in self.model_fields_set and self.num_gpus != devices:
            raise ValueError(
                f"num_gpus ({self.num_gpus:g}) must equal tensor_parallel_size x pipeline_parallel_size on GPUs "
                f"({devices}); leave it out, it is derived"
            )
        self.num_gpus = devices
        if self.device == "cpu" and self.accelerator_type:
            raise ValueError("accelerator_type needs device: gpu")
        if self.device == "gpu" and self.kv_cache_space_gib is not None:
            raise ValueError("kv_cache_space_gib is for device: cpu (on GPUs, set gpu_memory_utilization)")
        clashes = sorted(set(self.engine_kwargs) & set(_VLLM_FIELDS))
        if clashes:
            raise ValueError(f"engine_kwargs.{clashes[0]}: set it with {_VLLM_FIELDS[clashes[0]]}, not engine_kwargs")
        if self.placement_group_bundles is not None and len(self.placement_group_bundles) != self.num_workers:
            raise ValueError(
                f"placement_group_bundles has {len(self.placement_group_bundles)} bundles; the engine has "
                f"{self.num_workers} workers (tensor_parallel_size x pipeline_parallel_size)"
            )
        return self


class RegisteredBackends:
    """Makes ``ModelSpec`` the union, discriminated by ``backend``, of every registered backend's spec class: the
    built-ins and the plugins of :mod:`moa_ray.backends.registry`. It is assembled when the first config is
    validated (:class:`MoARayConfig` defers its schema till then), so that a plugin's module can import this one."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        specs = []
        for name, descriptor in backend_registry.backends().items():
            if not issubclass(descriptor.spec, ModelSpecBase):
                raise ConfigError(
                    f"backend {name!r} of {backend_registry.origin(name)}: its spec class {descriptor.spec.__qualname__} "
                    "must derive from moa_ray.config.ModelSpecBase"
                )
            specs.append(descriptor.spec)
        return handler.generate_schema(Annotated[functools.reduce(operator.or_, specs), Field(discriminator="backend")])


#: A model of any registered backend (its spec class, by the ``backend`` tag).
ModelSpec = Annotated[ModelSpecBase, RegisteredBackends()]


# --------------------------------------------------------------------------- pipelines


def _proposer_from_str(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class ProposerSpec(_Strict):
    """A call to a model with per-call overrides (temperature, max_tokens, a system role)."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**31, description="Sampling seed of this proposer's calls.")
    system: str | None = None

    @property
    def label(self) -> str:
        extras = []
        if self.temperature is not None:
            extras.append(f"t={self.temperature:g}")
        if self.system:
            extras.append("role")
        return f"{self.model}({', '.join(extras)})" if extras else self.model


ProposerRef = Annotated[ProposerSpec, BeforeValidator(_proposer_from_str)]


def _layer_from_list(value: Any) -> Any:
    return {"proposers": value} if isinstance(value, list) else value


class LayerSpec(_Strict):
    """One proposer layer; ``min_responses`` + ``deadline_s`` let it leave stragglers behind, and without a
    ``deadline_s`` the straggler bound does: a proposer whose provider holds its call (down, overloaded) would
    otherwise hold the whole request for as long as that provider's timeouts and retries allow."""

    proposers: list[ProposerRef] = Field(min_length=1)
    min_responses: int | None = Field(default=None, ge=1)
    deadline_s: float | None = Field(default=None, gt=0)
    straggler_wait_s: float | None = Field(
        default=20.0,
        gt=0,
        description="Once at least half of the layer's proposers (and min_responses) have answered, the rest are cut "
        "(traced as cut) this long after the layer started, or straggler_factor times the slowest answer so far when "
        "that is later. Off with a deadline_s (the layer's own bound). null: wait for every proposer, however long "
        "(the papers' semantics).",
    )
    straggler_factor: float = Field(default=3.0, ge=1, description="See straggler_wait_s.")

    @model_validator(mode="after")
    def _quorum(self) -> LayerSpec:
        if self.min_responses is not None and self.min_responses > len(self.proposers):
            raise ValueError(f"min_responses ({self.min_responses}) exceeds the layer's {len(self.proposers)} proposers")
        return self


LayerRef = Annotated[LayerSpec, BeforeValidator(_layer_from_list)]


class PipelineBase(_Strict):
    description: str = ""
    min_responses: int | None = Field(default=None, ge=1, description="Default quorum for every layer.")
    layer_deadline_s: float | None = Field(default=None, gt=0, description="Default deadline for every layer.")

    def resolved_layers(self) -> list[LayerSpec]:
        """Proposer layers with pipeline-level quorum/deadline defaults filled in."""
        out = []
        for layer in getattr(self, "layers", []):
            update: dict[str, Any] = {}
            if layer.min_responses is None and self.min_responses is not None:
                update["min_responses"] = min(self.min_responses, len(layer.proposers))
            if layer.deadline_s is None and self.layer_deadline_s is not None:
                update["deadline_s"] = self.layer_deadline_s
            out.append(layer.model_copy(update=update))
        return out

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        """Every (field path, proposer) this pipeline may call; used to validate references."""
        raise NotImplementedError


class _LayeredMixin(_Strict):
    layers: list[LayerRef] = Field(min_length=1)
    aggregator: ProposerRef

    def _layer_calls(self) -> list[tuple[str, ProposerSpec]]:
        out = [(f"layers[{i}][{j}]", p) for i, layer in enumerate(self.layers) for j, p in enumerate(layer.proposers)]
        out.append(("aggregator", self.aggregator))
        return out


class MoAPipelineSpec(PipelineBase, _LayeredMixin):
    """Mixture-of-Agents: proposer layers, each seeing the previous layer's answers, then an aggregator."""

    kind: Literal["moa"]

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        return self._layer_calls()


class RolesSpec(_Strict):
    """Role-playing: one LLM call turns a dataset and task description into n proposer roles."""

    dataset: str = Field(min_length=1)
    task: str = Field(min_length=1)
    model: ProposerRef | None = Field(default=None, description="Defaults to the pipeline's aggregator model.")


class SMoAPipelineSpec(PipelineBase, _LayeredMixin):
    """Sparse MoA: a judge keeps the best k responses per layer, a moderator may stop early."""

    kind: Literal["smoa"]
    judge: ProposerRef | None = Field(default=None, description="Defaults to the aggregator model.")
    k: int = Field(default=2, ge=1)
    moderator: bool | ProposerRef = True
    max_layers: int | None = Field(default=None, ge=1)
    roles: RolesSpec | None = None
    seed: int = 0
    shuffle_responses: bool = Field(
        default=False,
        description="Show the judge (and moderator) each layer's responses in a seeded random order, against "
        "position bias (the paper shows them in proposer order).",
    )

    @model_validator(mode="after")
    def _k_below_n(self) -> SMoAPipelineSpec:
        for i, layer in enumerate(self.layers):
            if self.k >= len(layer.proposers):
                raise ValueError(f"k ({self.k}) must be smaller than the {len(layer.proposers)} proposers of layers[{i}]")
        if self.max_layers is not None and self.max_layers > len(self.layers):
            raise ValueError(f"max_layers ({self.max_layers}) exceeds the {len(self.layers)} configured layers")
        return self

    @property
    def judge_spec(self) -> ProposerSpec:
        return self.judge or ProposerSpec(model=self.aggregator.model)

    @property
    def moderator_spec(self) -> ProposerSpec | None:
        """A separate moderator model, or None when the judge moderates (or moderation is off)."""
        return self.moderator if isinstance(self.moderator, ProposerSpec) else None

    @property
    def moderation_enabled(self) -> bool:
        return self.moderator is not False

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        out = [*self._layer_calls(), ("judge", self.judge_spec)]
        if self.moderator_spec is not None:
            out.append(("moderator", self.moderator_spec))
        if self.roles is not None and self.roles.model is not None:
            out.append(("roles.model", self.roles.model))
        return out


class SinglePipelineSpec(PipelineBase):
    """Baseline: one call to one model."""

    kind: Literal["single"]
    model: ProposerRef

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        return [("model", self.model)]


class RankerPipelineSpec(PipelineBase):
    """Baseline (LLM-ranker): the aggregator picks one of the n responses verbatim, no synthesis."""

    kind: Literal["ranker"]
    layers: list[LayerRef] = Field(min_length=1, max_length=1)
    aggregator: ProposerRef

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        return [(f"layers[0][{j}]", p) for j, p in enumerate(self.layers[0].proposers)] + [("aggregator", self.aggregator)]


class SelfMoAPipelineSpec(PipelineBase):
    """Baseline (Self-MoA): one model sampled n times at its temperature, then aggregated."""

    kind: Literal["self-moa"]
    model: ProposerRef
    n: int = Field(default=6, ge=2)
    aggregator: ProposerRef | None = Field(default=None, description="Defaults to the proposer model.")
    seed: int = Field(default=0, description="Sample i of a prompt gets a seed derived from (seed, prompt, i): reruns reproduce.")

    @property
    def aggregator_spec(self) -> ProposerSpec:
        return self.aggregator or ProposerSpec(model=self.model.model)

    @property
    def layers(self) -> list[LayerSpec]:
        return [LayerSpec(proposers=[self.model] * self.n)]

    def calls(self) -> list[tuple[str, ProposerSpec]]:
        return [("model", self.model), ("aggregator", self.aggregator_spec)]


PipelineSpec = Annotated[
    MoAPipelineSpec | SMoAPipelineSpec | SinglePipelineSpec | RankerPipelineSpec | SelfMoAPipelineSpec,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- root


class IngressSpec(_Strict):
    """Scaling of the HTTP ingress deployment (async and I/O bound: many requests per replica)."""

    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=0.1, ge=0)

    def deployment_options(self) -> dict[str, Any]:
        """Options for the ingress's ``Deployment.options``."""
        return serve_deployment_options({"num_cpus": self.num_cpus}, self.max_ongoing_requests, self.autoscaling, self.num_replicas)


class CorsSpec(_Strict):
    """Cross-origin access for browser clients (off unless configured): which origins may call the endpoint."""

    allow_origins: list[str] = Field(min_length=1, description='Origins allowed, e.g. ["https://app.example.com"]; ["*"] for any.')
    allow_headers: list[str] = Field(
        default_factory=lambda: ["*"], description="Request headers allowed (the openai SDK sends several of its own)."
    )
    allow_credentials: bool = Field(default=False, description="Allow cookies and HTTP auth (never with the origin '*').")
    max_age_s: int = Field(default=600, ge=0, description="How long browsers may cache a preflight's answer.")

    @model_validator(mode="after")
    def _no_credentials_for_everyone(self) -> CorsSpec:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials needs explicit origins, not '*'")
        return self


class ServerSpec(_Strict):
    """The OpenAI-compatible endpoint: its HTTP proxy and its limits."""

    proxy: Literal["haproxy", "python"] = Field(
        default="haproxy",
        description="The HTTP proxy in front of the ingress on the Ray moa-ray starts and in the manifests it writes: "
        "Ray Serve's HAProxy ingress (clients reach the ingress replicas' own HTTP servers through HAProxy, a C proxy) "
        "or Serve's Python proxy actor (each request and each streamed event an extra Ray hop). A cluster you join "
        "runs the proxy its nodes were started with (RAY_SERVE_ENABLE_HA_PROXY=1 on every node for HAProxy).",
    )

    max_tokens_limit: int = Field(default=4096, ge=1)
    max_message_chars: int = Field(default=100_000, ge=1)
    max_messages: int = Field(default=256, ge=1)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    body_timeout_s: float = Field(default=15.0, gt=0, description="A request body still arriving after this gets 408.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="A request still running after this gets 504.")
    stream_coalesce_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="A streamed answer's deltas are joined when they arrive within this many ms of each other (the first "
        "is sent at once): fewer events through the Serve proxy and to the client, the same bytes. 0: one event per token.",
    )
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    cors: CorsSpec | None = Field(default=None, description="Cross-origin access for browser clients; off by default.")
    access_log: bool = Field(
        default=True,
        description="Write one JSON line per API request (request id, pipeline, status, latency, calls, tokens, cost; "
        "never a prompt or a key) to the ingress replica's log (moa_ray.serve.access_log).",
    )


def fallback_chain(models: Mapping[str, ModelSpecBase], name: str) -> list[str]:
    """The models a failed call to ``name`` is made again on, in order: each fallback, then its own fallbacks
    (depth first), no model twice and never ``name`` itself. The config forbids cycles, so the chain ends."""
    chain: list[str] = []

    def visit(model: str) -> None:
        for other in models[model].fallbacks:
            if other != name and other not in chain and other in models:
                chain.append(other)
                visit(other)

    visit(name)
    return chain


def _fallback_problem(models: Mapping[str, ModelSpecBase]) -> str | None:
    """What is wrong with the models' fallbacks (an unknown name, the model itself, a repeat, a cycle), or None."""
    known = ", ".join(sorted(models))
    for name, spec in models.items():
        for i, other in enumerate(spec.fallbacks):
            where = f"models.{name}.fallbacks[{i}]"
            if other == name:
                return f"{where}: a model cannot fall back on itself"
            if other not in models:
                return f"{where}: unknown model {other!r} (known models: {known})"
            if other in spec.fallbacks[:i]:
                return f"{where}: {other!r} is listed twice"

    def cycle_from(path: list[str]) -> list[str] | None:
        for other in models[path[-1]].fallbacks:
            if other in path:
                return [*path[path.index(other) :], other]
            found = cycle_from([*path, other])
            if found:
                return found
        return None

    for name in models:
        cycle = cycle_from([name])
        if cycle:
            return (
                f"models.{cycle[0]}.fallbacks: the fallbacks form a cycle ({' -> '.join(cycle)}); a fallback's own "
                "fallbacks are tried after it, so a cycle would never end"
            )
    return None


class MoARayConfig(_Strict):
    """The root of a moa-ray YAML file."""

    model_config = ConfigDict(defer_build=True)  # till the backend registry can be read (see RegisteredBackends)

    models: dict[str, ModelSpec] = Field(min_length=1)
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)
    server: ServerSpec = Field(default_factory=ServerSpec)

    @model_validator(mode="after")
    def _references(self) -> MoARayConfig:
        known = ", ".join(sorted(self.models))
        for name, pipe in self.pipelines.items():
            for path, call in pipe.calls():
                if call.model not in self.models:
                    raise ValueError(f"pipelines.{name}.{path}.model: unknown model {call.model!r} (known models: {known})")
        return self

    @model_validator(mode="after")
    def _fallbacks(self) -> MoARayConfig:
        problem = _fallback_problem(self.models)
        if problem:
            raise ValueError(problem)
        return self

    def pipeline(self, name: str) -> PipelineSpec:
        try:
            return self.pipelines[name]
        except KeyError:
            raise ConfigError(f"unknown pipeline {name!r} (known pipelines: {', '.join(sorted(self.pipelines))})") from None

    def models_for(self, pipelines: list[str]) -> dict[str, ModelSpec]:
        """The models the named pipelines call, their fallbacks included, in config order."""
        needed = {call.model for p in pipelines for _, call in self.pipeline(p).calls()}
        needed |= {other for model in list(needed) for other in fallback_chain(self.models, model)}
        return {name: spec for name, spec in self.models.items() if name in needed}

    def deployed_models(self, models: Iterable[str]) -> list[str]:
        """Those of ``models`` that run as Serve deployments; the others (remote, in process) need none."""
        return [m for m in models if self.models[m].deployed]


def reload_backends() -> None:
    """Read the backend registry again and rebuild the config schema from it: for a plugin put on the path of a
    process that has validated a config already (a test, a notebook). Type adapters made before keep their union."""
    backend_registry.reload()
    MoARayConfig.model_rebuild(force=True)


def _field_path(parts: Any) -> str:
    """``pipelines.x.layers[0].proposers[2].temperature``: list indices in brackets, as in reference errors."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = _field_path(_user_path(e["loc"]))
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # name the discriminator field itself
            loc += "." + str(e.get("ctx", {}).get("discriminator", "")).strip("'")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


#: The pipelines' union tags (the models' are the registered backends' names).
_PIPELINE_KINDS = {"moa", "smoa", "single", "ranker", "self-moa"}


def _union_tags(section: Any) -> Iterable[str]:
    """Where pydantic puts a discriminated union's tag in an error path: right after ``models.<name>`` / ``pipelines.<name>``."""
    return backend_registry.backends() if section == "models" else _PIPELINE_KINDS if section == "pipelines" else ()


def _user_path(loc: tuple[Any, ...]) -> list[Any]:
    """The error path as the user wrote it: without the union tag pydantic inserts (by position only, so a model
    or pipeline *named* like a tag keeps its name) and without the before-validators' wrapper names."""
    parts = list(loc)
    if len(parts) > 2 and parts[2] in _union_tags(parts[0]):
        del parts[2]
    return [p for p in parts if not (isinstance(p, str) and p.startswith("function-before["))]


def parse_config(data: Any, source: str = "<dict>") -> MoARayConfig:
    """Validate a config mapping, raising :class:`ConfigError` that names each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping with 'models' and 'pipelines'")
    try:
        return MoARayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None) -> MoARayConfig:
    """Load a YAML config file, or the shipped presets when ``path`` is None."""
    if path is None:
        return load_presets()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {p}: {err}") from None
    return parse_config(data, str(p))


def load_presets() -> MoARayConfig:
    """All shipped presets merged into one config (each file adds models and pipelines)."""
    merged: dict[str, dict[str, Any]] = {"models": {}, "pipelines": {}}
    for entry in sorted(resources.files(PRESET_PACKAGE).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(entry.read_text()) or {}
        for section in ("models", "pipelines"):
            for key, value in (data.get(section) or {}).items():
                if key in merged[section] and merged[section][key] != value:
                    raise ConfigError(f"preset {entry.name}: {section}.{key} conflicts with another preset")
                merged[section][key] = value
    return parse_config(merged, "<presets>")


def dump_config(config: MoARayConfig) -> str:
    """YAML of a validated config with defaults filled in."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
