"""Configuration and interface shared by every sdort scheduler.

Matches the scheduler half of diffusers' ``ConfigMixin``/``SchedulerMixin`` (diffusers 0.42):

* ``config`` is a frozen dict with attribute access (diffusers' ``FrozenDict``) holding every
  ``__init__`` argument, ``_class_name`` and whatever else the loaded file carried; it saves to
  and loads from ``scheduler_config.json`` in diffusers' format.
* ``from_config`` moves a configuration between classes as diffusers does: keys the class does
  not take are kept in its config (so the next conversion still sees them), values that were
  defaults in the source (``_use_default_values``) give way to the new class's defaults, and keys
  no known scheduler takes are reported in one warning.
* the step counter (``step_index``/``begin_index``/``set_begin_index``/``index_for_timestep``) is
  written once here; the sigma-space helpers (``SigmaSchedulerMixin``) are in ``k_diffusion.py``.

Limitations: ``from_pretrained`` reads local folders only (no Hub download). Keys belonging to a
diffusers scheduler that sdort does not implement yet are warned about, where diffusers would keep
quiet. The config is truly frozen: change it with ``register_to_config``, not attribute setting.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .options import UnsupportedOptionError, check_option  # noqa: F401 (re-exported: base was their home)
from .schedule import threshold_sample

logger = logging.getLogger("sdort.schedulers")

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# Keys written next to the init arguments that are bookkeeping, not configuration.
_NOT_SAVED = ("_use_default_values", "_ignore_files")


class KarrasDiffusionSchedulers(enum.Enum):
    """The diffusers family of interchangeable schedulers (same names and values as diffusers)."""

    DDIMScheduler = 1
    DDPMScheduler = 2
    PNDMScheduler = 3
    LMSDiscreteScheduler = 4
    EulerDiscreteScheduler = 5
    HeunDiscreteScheduler = 6
    EulerAncestralDiscreteScheduler = 7
    DPMSolverMultistepScheduler = 8
    DPMSolverSinglestepScheduler = 9
    KDPM2DiscreteScheduler = 10
    KDPM2AncestralDiscreteScheduler = 11
    DEISMultistepScheduler = 12
    UniPCMultistepScheduler = 13
    DPMSolverSDEScheduler = 14
    EDMEulerScheduler = 15


KARRAS_COMPATIBLES = [e.name for e in KarrasDiffusionSchedulers]


class FrozenDict(dict):
    """A dict that cannot be changed once built, whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "a scheduler config is frozen; use scheduler.register_to_config(key=value) to change it"
        )

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _refuse
    pop = popitem = setdefault = update = clear = _refuse

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        import copy

        return type(self)(copy.deepcopy(dict(self), memo))


def _json_ready(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def register_to_config(init):
    """Decorator for a scheduler's ``__init__``: records every argument (given or default) in ``config``.

    Private keyword arguments (``_class_name``, ``_diffusers_version``…) are kept in the config and
    not passed to ``__init__``. The names of arguments left at their default are listed under
    ``_use_default_values`` (not saved), so that ``from_config`` into another class lets that
    class use its own defaults, as diffusers does.
    """
    signature = inspect.signature(init)
    params = [
        p
        for p in list(signature.parameters.values())[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        values = {p.name: a for p, a in zip(params, args)}
        given = set(values) | set(public)
        for p in params:
            if p.name not in values:
                values[p.name] = public.get(p.name, p.default)
        values = {k: v for k, v in values.items() if k not in ignore}
        entries = {**private, **values, "_class_name": type(self).__name__}
        defaults_used = [k for k in values if k not in given]
        if defaults_used:
            entries["_use_default_values"] = defaults_used
        self.register_to_config(**entries)
        init(self, *args, **public)

    return wrapper


_REGISTRY: dict[str, type] = {}


def _load_all_schedulers() -> None:
    # The package's __init__ imports every scheduler module, which registers its classes.
    importlib.import_module(__name__.rpartition(".")[0])


def get_scheduler_class(name):
    """The sdort scheduler class called ``name`` (a config's ``_class_name``).

    Also accepts a model_index.json entry such as ``["diffusers", "PNDMScheduler"]`` or a class.
    Unknown names raise a ValueError listing the known ones.
    """
    if isinstance(name, type) and issubclass(name, SchedulerMixin):
        return name
    if isinstance(name, (list, tuple)) and len(name) == 2:
        name = name[1]
    _load_all_schedulers()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown scheduler class {name!r}; sdort provides: {known}") from None


def _init_keys(cls) -> set:
    keys = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "args"}
    return keys - set(getattr(cls, "ignore_for_config", ()))


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x_{t-1}) and, where diffusers gives it, ``pred_original_sample``.

    Like diffusers' outputs it can be indexed by position or name; positions skip fields that are None.
    """

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key, None)
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]


class SchedulerMixin:
    """Base of all sdort schedulers: configuration, loading/saving, compatibility, step counter.

    Subclasses decorate ``__init__`` with ``@register_to_config`` and set ``order``; the class is
    registered under its name for ``get_scheduler_class`` when it is defined.
    """

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: list = []
    has_compatibles = True
    ignore_for_config: list = []
    order = 1
    init_noise_sigma = 1.0
    _step_index = None
    _begin_index = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and "__init__" in cls.__dict__:
            _REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ configuration
    def register_to_config(self, **kwargs) -> None:
        """Merge ``kwargs`` into the frozen ``config``."""
        kwargs.pop("kwargs", None)
        current = self.__dict__.get("_internal_dict", {})
        self._internal_dict = FrozenDict({**current, **kwargs})

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    @classmethod
    def extract_init_dict(cls, config_dict: Mapping, **kwargs):
        """Split a config into (``__init__`` arguments, unused keys, keys kept for compatible classes)."""
        used_defaults = set(config_dict.get("_use_default_values", ()))
        config = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        expected = _init_keys(cls)

        # Keys of compatible classes are expected in a shared file: keep them quietly.
        others = set()
        for other in cls._get_compatibles() if cls.has_compatibles else ():
            others |= _init_keys(other)
        config = {k: v for k, v in config.items() if k not in others - expected}

        source_name = config.pop("_class_name", cls.__name__)
        if not isinstance(source_name, (str, list, tuple)):
            raise ValueError("`_class_name` in a scheduler config must be a string")
        if isinstance(source_name, str) and source_name != cls.__name__ and source_name in _REGISTRY:
            source_keys = _init_keys(_REGISTRY[source_name])
            config = {k: v for k, v in config.items() if k not in source_keys - expected}
        config = {k: v for k, v in config.items() if not k.startswith("_")}

        init_dict = {}
        for key in expected:
            if key in kwargs:
                config.pop(key, None)
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config.pop(key)
        if config:
            logger.warning(
                "%s: the config keys %s are not used by this scheduler (nor by a compatible one) and are "
                "kept in its config unchanged; check your %s",
                cls.__name__,
                sorted(config),
                cls.config_name,
            )
        unused = {**config, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build this class from a config dict, another scheduler's ``.config`` or a folder path.

        ``kwargs`` override values of the config (``EulerDiscreteScheduler.from_config(cfg,
        timestep_spacing="trailing")``).
        """
        if config is None:
            config = kwargs.pop("pretrained_model_name_or_path", None)
        if config is None:
            raise ValueError("from_config needs a config: a dict, a scheduler's .config or a folder path")
        if isinstance(config, (str, os.PathLike)):
            config = cls.load_config(config)
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config expects a dict-like config, got {type(config).__name__}")
        _load_all_schedulers()
        init_dict, unused, hidden = cls.extract_init_dict(dict(config), **kwargs)
        scheduler = cls(**init_dict)
        hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs) -> dict:
        """Read ``scheduler_config.json`` from a file or folder (``subfolder`` inside it if given).

        With no subfolder, the folder itself is searched and then its ``scheduler/`` subfolder, so
        both a scheduler folder and a whole pipeline folder work.
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_file():
            candidates = [path]
        elif subfolder:
            candidates = [path / subfolder / cls.config_name]
        else:
            candidates = [path / cls.config_name, path / "scheduler" / cls.config_name]
        for candidate in candidates:
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ValueError(f"{candidate} is not a valid JSON file: {err}") from None
        tried = " or ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"no scheduler config found: {tried} does not exist (sdort reads local folders only)"
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs
    ):
        """Load from a folder holding ``scheduler_config.json`` (``subfolder="scheduler"`` for a pipeline folder)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        entries = {k: _json_ready(v) for k, v in self.config.items() if k not in _NOT_SAVED}
        entries["_class_name"] = type(self).__name__
        return json.dumps(entries, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if needed)."""
        if push_to_hub:
            raise NotImplementedError("sdort does not push to the Hugging Face Hub")
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"{save_directory} should be a directory, not a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(save_directory / self.config_name)

    save_pretrained = save_config

    @classmethod
    def _get_compatibles(cls) -> list:
        _load_all_schedulers()
        names = [cls.__name__] + [n for n in cls._compatibles if n != cls.__name__]
        return [_REGISTRY[n] for n in names if n in _REGISTRY]

    @property
    def compatibles(self) -> list:
        """The sdort classes this scheduler's config can be moved to with ``from_config``."""
        return self._get_compatibles()

    def _threshold_sample(self, sample):
        """diffusers' dynamic thresholding with this scheduler's ratio and max value."""
        return threshold_sample(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def _check_ready(self) -> None:
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")

    def _check_step_count(self, num_inference_steps) -> None:
        # a subset of the training timesteps cannot have more of them than there are
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} cannot be larger than num_train_timesteps={T}"
            )

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ------------------------------------------------------------------ step counter
    @property
    def step_index(self):
        """Index of the current timestep; advances by one per ``step``."""
        return self._step_index

    @property
    def begin_index(self):
        """Index of the first timestep, set by the pipeline through ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` (image-to-image starts part-way through ``timesteps``)."""
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``).

        Where the value occurs more than once, the second occurrence is taken, as diffusers does, so
        that a schedule starting in the middle of a repeated value does not skip a sigma.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        value = np.asarray(timestep).reshape(-1)
        if value.size != 1:
            raise ValueError(f"expected a single timestep, got an array of shape {np.shape(timestep)}")
        matches = np.flatnonzero(np.asarray(schedule_timesteps) == value[0])
        if matches.size == 0:
            raise ValueError(f"timestep {value[0]!r} is not one of the scheduler's timesteps")
        return int(matches[1] if matches.size > 1 else matches[0])

    def _init_step_index(self, timestep) -> None:
        # The search happens once, and only when the pipeline did not call set_begin_index.
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _count_step(self, timestep) -> None:
        # Step counter of schedulers whose maths reads the timestep value (DDIM, DDPM, PNDM): kept for
        # the pipelines only. Starts at begin_index, else at the first timestep's index if it has one.
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif self.timesteps is not None and np.any(np.asarray(self.timesteps) == np.asarray(timestep).reshape(-1)[0]):
                self._step_index = self.index_for_timestep(timestep)
            else:
                return
        self._step_index += 1

    def _step_indices_for(self, timesteps) -> list:
        # Which sigma add_noise uses for each timestep, as diffusers decides it.
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t, self.timesteps) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]
