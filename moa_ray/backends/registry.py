"""The backend registry: one descriptor per backend, the built-ins first, then plugins from entry points.

A :class:`BackendDescriptor` holds what moa-ray knows of a backend: the tag a config names it by (``backend:
<name>``) and its spec class, how to make its in-process :class:`~moa_ray.backends.base.ChatBackend` and/or its own
Serve deployment, what must be installed where its models run, and which environment variables hold its secrets.
Config validation (the ``ModelSpec`` union of :mod:`moa_ray.config`), the extras check before a local Ray starts,
the Serve builder, the manifests and the redaction of secrets all read it here, so that a backend from another
package works in a config with no change to moa-ray. Such a package registers its descriptor under the entry-point
group ``moa_ray.backends``, the entry point named as the backend::

    [project.entry-points."moa_ray.backends"]
    mybackend = "my_package.backend:BACKEND"

The built-ins are loaded through the same path as plugins, by name (as simonw/llm loads its default plugins): this
module imports none of them, so :mod:`moa_ray.config` can assemble its union from here while the backends' spec
classes live in it. Loading happens once per process, on first use; :func:`reload` reads the entry points again.
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from moa_ray import errors
from moa_ray.errors import ConfigError

if TYPE_CHECKING:
    from moa_ray.backends.base import ChatBackend
    from moa_ray.config import ModelSpecBase

GROUP = "moa_ray.backends"

#: The built-in backends, in the order a config error lists them; loaded like plugins, by name.
BUILTINS = (
    EntryPoint("openai", "moa_ray.backends.builtins:OPENAI", GROUP),
    EntryPoint("llamacpp", "moa_ray.backends.builtins:LLAMACPP", GROUP),
    EntryPoint("vllm", "moa_ray.serve.llm:VLLM", GROUP),  # beside its Ray Serve LLM code
)

SpecT = TypeVar("SpecT", bound="ModelSpecBase")


def _no_secrets(spec: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class BackendDescriptor(Generic[SpecT]):
    """Everything moa-ray needs to know about one backend.

    Hosting follows the spec: a model whose spec says it is not ``deployed`` (a :class:`~moa_ray.config.RemoteModelSpec`
    with ``hosting: in_process``) is called through ``create`` in the calling process; a deployed one runs in its own
    Serve deployment, which ``build`` makes when given (vLLM's ``LLMServer``), else an agent deployment hosting ``create``.
    """

    name: str
    """The config's tag (``backend: <name>``); the spec class declares ``backend: Literal[<name>]``."""
    spec: type[SpecT]
    """The model spec class (a :class:`~moa_ray.config.ModelSpecBase`): its fields are the config's for this backend."""
    create: Callable[[SpecT], ChatBackend] | None = None
    """Makes the in-process backend of a model (in an agent deployment's replicas, or in the calling process)."""
    build: Callable[[str, SpecT, str, dict[str, str]], Any] | None = None
    """``(model name, spec, deployment name, env vars) -> Application``: a deployment of its own, speaking the agent
    protocol, for a backend that is no :class:`ChatBackend` (vLLM under Ray Serve LLM)."""
    deployment_options: Callable[[str, SpecT, dict[str, str]], dict[str, Any]] | None = None
    """``(model name, spec, env vars) -> options`` of the deployment ``build`` makes (the Serve config and manifests
    deploy alike); required with ``build``."""
    modules: tuple[str, ...] = ()
    """Modules its models need where they run, checked before a local Ray starts."""
    install: str | None = None
    """How to install ``modules``, shown when one is missing (``pip install 'moa-ray[embedded]'``)."""
    secret_envs: Callable[[SpecT], tuple[str, ...]] = _no_secrets
    """The environment variables holding the keys a model's calls need (a provider's API key): warned about when
    unset, mounted from the cluster's Secret, redacted from whatever leaves a process."""
    optional_secret_envs: tuple[str, ...] = ()
    """Secrets only some of its models need (a Hugging Face token for gated models): mounted and redacted, never asked for."""
    tools_unsupported: Callable[[str, SpecT], str | None] | None = None
    """``(model name, spec) -> why`` the model cannot answer with tool calls, or None when it can (the default)."""

    def __post_init__(self) -> None:
        tag = getattr(self.spec, "model_fields", {}).get("backend")
        if tag is None or typing.get_args(tag.annotation) != (self.name,):
            raise TypeError(f"the spec class {self.spec!r} of backend {self.name!r} must declare backend: Literal[{self.name!r}]")
        if self.create is None and self.build is None:
            raise TypeError(f"backend {self.name!r} gives neither create (an in-process backend) nor build (a deployment)")
        if self.create is None and "hosting" in self.spec.model_fields:
            raise TypeError(f"backend {self.name!r}: its spec offers hosting: in_process, which needs create (an in-process backend)")
        if (self.build is None) != (self.deployment_options is None):
            raise TypeError(f"backend {self.name!r}: build and deployment_options go together")

    def missing_module_message(self, module: str) -> str:
        """One line naming what installs ``module``."""
        return f"this needs {module}, which is not installed: {self.install or 'install it'}"


@dataclass(frozen=True)
class _Loaded:
    descriptors: dict[str, BackendDescriptor[Any]]
    origins: dict[str, str]  # backend name -> where it came from, for error messages


_lock = threading.RLock()
_loaded: _Loaded | None = None
_loading = False  # in this module's lock: a plugin module that reads the registry as it is imported


def _where(entry: EntryPoint) -> str:
    package = f", package {entry.dist.name}" if entry.dist is not None else ""
    return f"entry point {entry.name!r} = {entry.value!r} (group {GROUP!r}{package})"


def _load_entry(entry: EntryPoint, origin: str) -> BackendDescriptor[Any]:
    try:
        found = entry.load()
    except Exception as err:  # an import error, a bad descriptor: the plugin's fault, named as such
        raise ConfigError(f"backend plugin {origin} failed to load: {type(err).__name__}: {err}") from err
    if not isinstance(found, BackendDescriptor):
        raise ConfigError(f"backend plugin {origin} gives a {type(found).__name__}, not a moa_ray.backends.registry.BackendDescriptor")
    if found.name != entry.name:
        raise ConfigError(f"backend plugin {origin} gives the backend {found.name!r}: name the entry point as its backend")
    return found


def _load() -> _Loaded:
    descriptors: dict[str, BackendDescriptor[Any]] = {}
    origins: dict[str, str] = {}
    found = [(entry, f"{entry.value} (built in)") for entry in BUILTINS]
    found += [(entry, _where(entry)) for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name)]
    for entry, origin in found:
        descriptor = _load_entry(entry, origin)
        if descriptor.name in descriptors:
            raise ConfigError(f"backend {descriptor.name!r} is registered twice: by {origins[descriptor.name]} and by {origin}")
        descriptors[descriptor.name] = descriptor
        origins[descriptor.name] = origin
    return _Loaded(descriptors, origins)


def _registry() -> _Loaded:
    global _loaded, _loading
    with _lock:
        if _loaded is None:
            if _loading:
                raise ConfigError("a backend plugin reads the backend registry as it is imported: read it when it is used")
            _loading = True
            try:
                _loaded = _load()  # a failure is not kept: the next call tries again
            finally:
                _loading = False
        return _loaded


def reload() -> None:
    """Forget the loaded backends, so the next use reads the entry points again (a plugin installed since)."""
    global _loaded
    with _lock:
        _loaded = None


def backends() -> Mapping[str, BackendDescriptor[Any]]:
    """Every registered backend by name: the built-ins, then the plugins by name. Raises :class:`ConfigError`
    naming the entry point of a plugin that cannot load."""
    return _registry().descriptors


def origin(name: str) -> str:
    """Where the backend ``name`` was registered (the built-ins' module, or a plugin's entry point)."""
    return _registry().origins[name]


def backend(name: str) -> BackendDescriptor[Any]:
    """The descriptor of the backend ``name``."""
    known = backends()
    try:
        return known[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r} (known backends: {', '.join(known)})") from None


def descriptor_for(spec: ModelSpecBase) -> BackendDescriptor[Any]:
    """The descriptor of the backend a model spec names."""
    return backend(getattr(spec, "backend", ""))


def create_backend(spec: ModelSpecBase) -> ChatBackend:
    """The in-process backend a model spec names (its engine is imported here, where the model runs)."""
    descriptor = descriptor_for(spec)
    if descriptor.create is None:
        raise ConfigError(f"backend {descriptor.name!r} has no in-process backend: its models run as their own Serve deployments")
    return descriptor.create(spec)


def tools_unsupported(name: str, spec: ModelSpecBase) -> str | None:
    """Why model ``name`` cannot answer with tool calls, or None when it can."""
    check = descriptor_for(spec).tools_unsupported
    return None if check is None else check(name, spec)


def required_secret_envs(specs: Iterable[ModelSpecBase]) -> list[str]:
    """The environment variables holding keys these models' calls need, sorted."""
    return sorted({env for spec in specs for env in descriptor_for(spec).secret_envs(spec)})


def secret_envs(specs: Iterable[ModelSpecBase]) -> list[str]:
    """Every environment variable holding a secret these models may read (needed or optional), sorted."""
    specs = list(specs)
    optional = {env for spec in specs for env in descriptor_for(spec).optional_secret_envs}
    return sorted(set(required_secret_envs(specs)) | optional)


def missing_module_message(module: str) -> str | None:
    """One line naming what installs ``module``: a backend's ``install``, else the package extra
    (:func:`moa_ray.errors.missing_module_message`); None for a module nothing provides."""
    top = module.split(".")[0]
    try:
        known = backends()
    except ConfigError:  # a broken plugin must not hide the missing module; its own error comes with any config
        known = {}
    for descriptor in known.values():
        if top in descriptor.modules:
            return descriptor.missing_module_message(module)
    return errors.missing_module_message(module)
