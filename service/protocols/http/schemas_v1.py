"""Request and response bodies of the v1 API, with the examples /docs shows."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, JsonValue, Strict

from service.core.model import ActivationSpec

#: A JSON number that is finite: strings, booleans and null are refused, not coerced.
Number = Annotated[float, Strict(), AllowInfNan(False)]
Matrix = list[list[float]]
MAX_SEED = 2**63 - 1

# One row of the concrete data set (cement, slag, ash, water, superplasticizer, coarse
# aggregate, fine aggregate in kg/m3, age in days); its measured strength is 79.99 MPa.
_EXAMPLE_ROW: list[JsonValue] = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Request):
    inputs: list[list[Number]] = Field(
        min_length=1,
        description="Rows of input_dim finite numbers; at most the configured maximum rows.",
    )

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": [_EXAMPLE_ROW]}]}
    )


class MCRequest(PredictRequest):
    n_samples: Annotated[int, Strict()] | None = Field(
        None, ge=2, description="Stochastic passes T (default and maximum are settings)."
    )
    seed: Annotated[int, Strict()] | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of this request's generator; drawn if absent."
    )
    return_samples: Annotated[bool, Strict()] = Field(
        False, description="Also return every sample, [T][rows][outputs]."
    )
    coverage: Number | None = Field(
        None,
        description="0.5 to 0.999: add an interval (regression) or prediction sets "
        "(classification) holding this share of targets; conformal when the model is "
        "calibrated, else Gaussian (regression) or the most probable classes.",
    )
    target_se: Number | None = Field(
        None,
        description="Stop sampling once every output's MC standard error is at most this "
        "(n_samples passes at most; without n_samples, the configured maximum).",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": [_EXAMPLE_ROW], "n_samples": 100, "seed": 7},
                {"inputs": [_EXAMPLE_ROW], "seed": 7, "coverage": 0.95, "target_se": 0.5},
            ]
        },
    )


class PredictResponse(BaseModel):
    model: str
    version: str
    outputs: Matrix = Field(description="[rows][outputs]; class probabilities for classifiers.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "concrete", "version": "1", "outputs": [[77.41]]}]
        }
    )


class Interval(BaseModel):
    coverage: float
    method: Literal["conformal", "gaussian"] = Field(
        description="conformal: from the model's held-out calibration, a finite-sample "
        "guarantee; gaussian: mean +- z sqrt(predictive_variance), uncalibrated."
    )
    lower: Matrix
    upper: Matrix


class MCResponse(BaseModel):
    model: str
    version: str
    n_samples: int = Field(description="Passes drawn (fewer than asked when target_se was met).")
    seed: int = Field(description="The seed used: send it back to replay this answer bit for bit.")
    mean: Matrix
    variance: Matrix = Field(description="Population variance over the T samples (epistemic).")
    std: Matrix
    mc_standard_error: Matrix = Field(
        description="sqrt(variance / n_samples): how far the mean may sit from the T -> "
        "infinity mean."
    )
    predictive_variance: Matrix | None = Field(
        None, description="Regression: variance + the model's noise_variance (aleatoric)."
    )
    entropy: list[float] | None = Field(
        None, description="Classification: predictive entropy (nats) per row."
    )
    mutual_information: list[float] | None = Field(
        None, description="Classification: mutual information (BALD) per row."
    )
    calibrated_probabilities: Matrix | None = Field(
        None,
        description="Classification, calibrated models: mean probabilities after "
        "temperature scaling.",
    )
    interval: Interval | None = Field(None, description="Regression, with coverage.")
    prediction_sets: list[list[int]] | None = Field(
        None, description="Classification, with coverage: per row, the class indices of its set."
    )
    prediction_set_method: Literal["conformal", "probability"] | None = Field(
        None,
        description="conformal: from the held-out calibration; probability: the most "
        "probable classes until their mean probabilities reach coverage (uncalibrated).",
    )
    ood_score: list[float] | None = Field(
        None,
        description="Calibrated models: per row, the spread over its held-out 99th "
        "percentile (the largest over outputs).",
    )
    out_of_distribution: list[bool] | None = Field(
        None, description="Calibrated models: ood_score > 1."
    )
    samples: list[Matrix] | None = Field(None, description="[T][rows][outputs] when asked for.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "concrete",
                    "version": "1",
                    "n_samples": 100,
                    "seed": 7,
                    "mean": [[76.9]],
                    "variance": [[9.8]],
                    "std": [[3.13]],
                    "mc_standard_error": [[0.313]],
                    "predictive_variance": [[33.5]],
                    "interval": {
                        "coverage": 0.95,
                        "method": "conformal",
                        "lower": [[66.1]],
                        "upper": [[87.7]],
                    },
                    "ood_score": [0.41],
                    "out_of_distribution": [False],
                }
            ]
        }
    )


class ReplayScope(BaseModel):
    """What an answer's bits depend on beyond the model version, the request and its seed.

    The same values replay the same bits, whatever the load, batch, worker or thread count;
    another torch build or CPU kind (AVX-512 against AVX2, ARM) may differ in the last bits.
    """

    torch_version: str = Field(examples=["2.13.0+cpu"])
    cpu_capability: str = Field(
        description="torch.backends.cpu.get_cpu_capability(): the vector kernels torch chose.",
        examples=["AVX512"],
    )
    device: str = Field(examples=["cpu"])
    mask_mode: Literal["packed", "torch"] = Field(description="How MC draws its masks.")
    mc_chunk_elements: int = Field(description="Activation elements per MC chunk.")
    mc_tile_elements: int = Field(description="Activation elements per MC tile.")
    eval_block_rows: int = Field(description="Rows of every (zero-padded) eval pass.")


class CalibrationSummary(BaseModel):
    """What ``coverage`` and the out-of-distribution flags of this model rest on."""

    held_out_rows: int
    fitted_on: str
    max_coverage: float = Field(description="The largest coverage the held-out rows bound.")
    temperature: float | None = Field(None, description="Classification: the temperature.")
    out_of_distribution: bool = Field(description="Whether answers carry ood_score.")


class ModelMetadata(BaseModel):
    name: str
    version: str
    task: Literal["regression", "classification"]
    input_dim: int
    output_dim: int
    hidden: list[int]
    activation: ActivationSpec | list[ActivationSpec] = Field(
        description="The activation of every hidden layer, or one per layer."
    )
    output_activation: ActivationSpec | None = None
    dropout: list[float] = Field(description="Dropout p after each hidden layer.")
    input_dropout: float
    dropout_scaling: Literal["inverted", "vanilla"]
    labels: list[str] | None = None
    feature_names: list[str] | None = Field(None, description="One name per input, if known.")
    example: list[float] | None = Field(None, description="An input row to start from.")
    noise_variance: list[float] | None = None
    sha256: str
    metrics: dict[str, object] = Field(default_factory=dict)
    calibration: CalibrationSummary | None = Field(
        None, description="None: intervals are Gaussian, sets the most probable classes."
    )
    replay: ReplayScope


class ModelList(BaseModel):
    models: list[ModelMetadata]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "loading", "not ready"]
    models: list[str] = Field(default_factory=list, description="Models being served.")
    failed: dict[str, str] = Field(default_factory=dict, description="Refused models: reason.")


class ErrorBody(BaseModel):
    """404, 413 and 503 answers."""

    detail: str = Field(examples=["model 'x' not found; served models: concrete"])


class FieldError(BaseModel):
    type: str = Field(description="Error kind, e.g. float_type, missing, value_error.")
    loc: list[str | int] = Field(description="Where: 'body' or 'path', then the field path.")
    msg: str


class ValidationErrorBody(BaseModel):
    """422 answers: one entry per bad field. The offending value is never echoed."""

    detail: list[FieldError]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": [
                        {
                            "type": "value_error",
                            "loc": ["body", "inputs", 0],
                            "msg": "row 0 has 3 values; model 'concrete' expects 8",
                        }
                    ]
                }
            ]
        }
    )


class CompareRequest(PredictRequest):
    n_samples: Annotated[int, Strict()] | None = Field(
        None, ge=2, description="MC passes T (default and maximum are settings)."
    )
    seed: Annotated[int, Strict()] | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the MC draw (as predict/mc) and of the train passes; drawn if absent.",
    )
    n_train_passes: Annotated[int, Strict()] = Field(
        5,
        ge=2,
        le=32,
        description="Single train-mode passes k: what k identical calls to a "
        "service that forgot model.eval() would answer.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [_EXAMPLE_ROW], "n_samples": 1000, "seed": 7}]},
    )


class CompareTiming(BaseModel):
    eval: float = Field(description="Milliseconds for the eval pass.")
    train_passes: list[float] = Field(description="Milliseconds for each single train pass.")
    mc: float = Field(description="Milliseconds for the n_samples MC passes.")


class CompareResponse(BaseModel):
    model: str
    version: str
    n_samples: int
    seed: int = Field(description="The seed used: predict/mc with it returns mc_mean and mc_std.")
    eval: Matrix = Field(description="Eval-mode output [rows][outputs]: equals predict.")
    train_passes: list[Matrix] = Field(
        description="[k][rows][outputs]: k single stochastic passes, each seeded from `seed`."
    )
    train_pass_seeds: list[int] = Field(
        description="Seed of each train pass: its answer is the one sample of predict/mc "
        "with n_samples 1 and that seed (not a valid predict/mc request, which needs T >= 2)."
    )
    mc_mean: Matrix = Field(description="MC mean over n_samples passes: equals predict/mc mean.")
    mc_std: Matrix = Field(description="MC std over n_samples passes: equals predict/mc std.")
    gap: Matrix = Field(
        description="mc_mean - eval: the error of eval's weight-scaling approximation (plus "
        "MC noise of order mc_std / sqrt(n_samples))."
    )
    timing_ms: CompareTiming

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "concrete",
                    "version": "1",
                    "n_samples": 1000,
                    "seed": 7,
                    "eval": [[72.38]],
                    "train_passes": [[[64.59]], [[73.23]], [[70.45]], [[67.83]], [[73.23]]],
                    "train_pass_seeds": [
                        1693125408465869867,
                        2021251017632032385,
                        8779501138110131270,
                        3411976877185804603,
                        9163023660662787564,
                    ],
                    "mc_mean": [[72.33]],
                    "mc_std": [[1.87]],
                    "gap": [[-0.055]],
                    "timing_ms": {
                        "eval": 0.1,
                        "train_passes": [0.1, 0.1, 0.1, 0.1, 0.1],
                        "mc": 2.5,
                    },
                }
            ]
        }
    )
