"""Model specs (`configs/models/<name>.yaml`): the declared contract of every model radloop
serves — network, input rules, preprocessing, coded labels, inference and uncertainty.

Specs are validated when radloop starts; a wrong spec stops start-up with the file and key.
Whether the declared network exists and builds is checked by the processes that build one
(`radloop models`, the training worker and its flow): importing MONAI costs 7 s on 2 cores,
which the gateway, the review service and every CLI call would otherwise pay for nothing.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Orientation(StrEnum):
    AXIAL = "axial"
    ANY = "any"


class UncertaintyMethod(StrEnum):
    ENTROPY = "entropy"
    MC_DROPOUT = "mc_dropout"
    FLIP_TTA = "flip_tta"


class SelectionStrategy(StrEnum):
    """Active-learning strategies (`agents.selection.STRATEGIES` implements each)."""

    RANDOM = "random"
    ENTROPY = "entropy"
    MC_DROPOUT = "mc_dropout"
    FLIP_TTA = "flip_tta"
    DIVERSITY = "diversity"
    HYBRID = "hybrid"


class Interaction(StrEnum):
    # DeepEdit: image + one click map per label (background first) + the current label, one
    # hot; one network segments with no clicks and refines with them.
    DEEPEDIT = "deepedit"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checks_networks(info: ValidationInfo) -> bool:
    return not isinstance(info.context, dict) or info.context.get("networks", True) is not False


class NetworkSpec(_Strict):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_network(cls, value: str, info: ValidationInfo) -> str:
        if not _checks_networks(info):
            return value
        from monai.networks import nets

        if not isinstance(getattr(nets, value, None), type):
            raise ValueError(f"{value!r} is not a network in monai.networks.nets")
        return value

    @model_validator(mode="after")
    def _builds(self, info: ValidationInfo) -> Self:
        # The declared arguments must build the declared network; a typo fails here, at start.
        if not _checks_networks(info):
            return self
        try:
            self.build()
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(f"{self.name}(**args) fails: {error}") from None
        return self

    def build(self) -> Any:
        """Instantiate the MONAI network (a `torch.nn.Module`)."""
        from monai.networks import nets

        return getattr(nets, self.name)(**self.args)


class InputRules(_Strict):
    modality: str
    series_description: str = ".*"
    min_slices: int = Field(1, ge=1)
    orientation: Orientation = Orientation.AXIAL

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value

    def matches_description(self, description: str | None) -> bool:
        return re.fullmatch(self.series_description, description or "", re.IGNORECASE) is not None


class Window(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min >= self.max:
            raise ValueError("min must be below max")
        return self


class Preprocessing(_Strict):
    spacing: tuple[float, float, float]
    window: Window

    @field_validator("spacing")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError("spacing must be positive")
        return value


class Code(_Strict):
    """A coded concept, as DICOM SEG's segmented property category and type need."""

    code: str
    scheme: str
    meaning: str


class Label(_Strict):
    value: int = Field(ge=1, le=255)
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int] | None = None


class Inference(_Strict):
    roi_size: tuple[int, int, int]
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(1, ge=1)

    @field_validator("roi_size")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v <= 0 for v in value):
            raise ValueError("roi_size must be positive")
        return value


class Uncertainty(_Strict):
    method: UncertaintyMethod = UncertaintyMethod.ENTROPY
    samples: int = Field(4, ge=1)


class ActiveLearning(_Strict):
    """How the model's open cases are ordered for readers, until an admin sets another
    strategy (`radloop models strategy`, kept in the database)."""

    strategy: SelectionStrategy = SelectionStrategy.ENTROPY
    seed: int = Field(0, ge=0)


class Retraining(_Strict):
    """When and how `flows/retrain.py` fine-tunes this model."""

    # Validated train labels since the last training run that start the next one.
    threshold: int = Field(ge=1)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(8, ge=1)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)
    # The challenger is promoted when its mean holdout Dice >= the champion's minus this.
    gate_margin: float = Field(0.02, ge=0, le=1)


class Interactive(_Strict):
    """The task's click-guided model (`agents.interactive`): served by Triton as
    `<task>-<interaction>`, trained with simulated clicks, gated on Dice after
    `gate_clicks` simulated clicks per label."""

    interaction: Interaction = Interaction.DEEPEDIT
    network: NetworkSpec
    # The whole volume, windowed, is resized to this (slices, rows, columns) for one pass:
    # a click must see the organ it is on, and one pass keeps a click under a second on a CPU.
    spatial_size: tuple[int, int, int]
    # Gaussian sigma of a click map, in voxels of `spatial_size`.
    sigma: float = Field(2.0, gt=0)
    # A refinement changes the label it starts from within this distance of a click (voxels
    # of `spatial_size`) and nowhere else; from an empty label it answers everywhere.
    radius: float = Field(6.0, gt=0)
    # Clicks per label and request; more are refused with the reason.
    max_clicks: int = Field(10, ge=1, le=100)
    gate_clicks: int = Field(3, ge=0)
    steps: int = Field(200, ge=1)  # batches of `radloop models bootstrap` and of fine-tuning
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(1e-3, gt=0)

    @field_validator("spatial_size")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v <= 0 for v in value):
            raise ValueError("spatial_size must be positive")
        return value


class ModelSpec(_Strict):
    name: str
    description: str = ""
    network: NetworkSpec
    input: InputRules
    preprocessing: Preprocessing
    labels: list[Label] = Field(min_length=1)
    inference: Inference
    uncertainty: Uncertainty = Uncertainty()
    active_learning: ActiveLearning = ActiveLearning()
    retraining: Retraining
    interactive: Interactive | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (at most 63)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        values = [label.value for label in self.labels]
        if sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError(f"label values must be 1..{len(values)}, each once (got {values})")
        out_channels = self.network.args.get("out_channels")
        if out_channels is not None and out_channels != len(values) + 1:
            raise ValueError(
                f"network.args.out_channels is {out_channels}; background plus "
                f"{len(values)} labels needs {len(values) + 1}"
            )
        if self.uncertainty.method != UncertaintyMethod.ENTROPY and self.uncertainty.samples < 2:
            raise ValueError(f"uncertainty.samples must be >= 2 for {self.uncertainty.method}")
        self.check_strategy(self.active_learning.strategy)
        if self.interactive is not None:
            args = self.interactive.network.args
            channels = {
                "in_channels": 1 + (len(values) + 1) + len(values),
                "out_channels": len(values) + 1,
            }
            for key, wanted in channels.items():
                if args.get(key, wanted) != wanted:
                    raise ValueError(
                        f"interactive.network.args.{key} is {args[key]}; DeepEdit with "
                        f"{len(values)} labels needs {wanted} (image, a click map for "
                        "background and each label, the current label one-hot)"
                        if key == "in_channels"
                        else f"interactive.network.args.{key} is {args[key]}; needs {wanted}"
                    )
        return self

    def check_strategy(self, strategy: SelectionStrategy) -> None:
        """Refuse a strategy whose score this model's drafts do not carry."""
        needs_variance = (SelectionStrategy.MC_DROPOUT, SelectionStrategy.FLIP_TTA)
        if strategy in needs_variance and strategy.value != self.uncertainty.method.value:
            raise ValueError(
                f"strategy {strategy.value} ranks on the {strategy.value} score, which "
                f"{self.name}'s drafts compute only with uncertainty.method: {strategy.value} "
                f"(it is {self.uncertainty.method.value})"
            )

    # Set on the spec `as_interactive` derives: the task it belongs to.
    _task: str | None = PrivateAttr(None)

    @property
    def interactive_name(self) -> str | None:
        """The name Triton, MLflow and the MONAI Label API know the interactive model by."""
        if self.interactive is None:
            return None
        if self._task is not None:
            return self.name
        return f"{self.name}-{self.interactive.interaction.value}"

    @property
    def is_interactive(self) -> bool:
        """Whether this is the spec of a task's interactive model (`as_interactive`)."""
        return self._task is not None

    @property
    def task(self) -> str:
        """The task whose validated labels this model learns from: its own name, or for an
        interactive model its task's."""
        return self._task or self.name

    def as_interactive(self) -> ModelSpec:
        """The spec of this task's interactive model: its name and network, the task's labels,
        preprocessing and retraining. Everything that serves, tracks, retrains and gates a
        model by its spec handles it as a model of its own."""
        if self._task is not None:
            return self
        if self.interactive is None:
            raise ValueError(f"model {self.name} declares no interactive model")
        derived = self.model_copy(
            update={"name": self.interactive_name, "network": self.interactive.network}
        )
        derived._task = self.name
        return derived


class ModelSpecError(Exception):
    """A spec file is unreadable or invalid; the message names the file and each key."""


def load_spec(path: Path, *, networks: bool = True) -> ModelSpec:
    """The spec in `path`; with `networks=False` its network is not imported or built."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ModelSpecError(f"{path}: cannot read: {error}") from None
    try:
        spec = ModelSpec.model_validate(data, context={"networks": networks})
    except ValidationError as error:
        lines = [
            f"{path}: {'.'.join(str(p) for p in item['loc']) or '(top)'}: {item['msg']}"
            for item in error.errors()
        ]
        raise ModelSpecError("\n".join(lines)) from None
    if spec.name != path.stem:
        raise ModelSpecError(f"{path}: name: {spec.name!r} differs from the file name")
    return spec


def load_specs(folder: Path, *, networks: bool = True) -> dict[str, ModelSpec]:
    """Every `*.yaml` spec in `folder`, by name; all errors reported together."""
    specs: dict[str, ModelSpec] = {}
    errors: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            spec = load_spec(path, networks=networks)
        except ModelSpecError as error:
            errors.append(str(error))
            continue
        specs[spec.name] = spec
    for spec in specs.values():
        if spec.interactive_name in specs:
            errors.append(
                f"{folder / spec.name}.yaml: interactive: its model would be named "
                f"{spec.interactive_name!r}, the name of another spec"
            )
    if errors:
        raise ModelSpecError("\n".join(errors))
    return specs
