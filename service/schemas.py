"""HTTP protocol types (pydantic v2), apart from the serving logic and the server wiring.

Static shape rules live here; limits that are settings (turns, characters, batch size) are
checked by the predictor (:func:`service.predictor.check_dialogue`), which reports them in the
same error format (:mod:`service.exceptions`). The predictor never sees these types:
:mod:`service.routes.predict` translates them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.labels import LABEL_SETS


#: Hard ceilings of the request shapes, checked by pydantic before it validates a single item
#: (so 20,000 wrong turns are one error, not 20,000). The ERC_MAX_* settings may only lower them.
TURNS_CEILING = 1000
DIALOGUES_CEILING = 256
#: Turns in one /predict_dialogue, counted before any turn is validated: 256 dialogues of 1,000
#: wrong turns would otherwise build 512,000 errors (seconds of CPU) to report 10 of them.
BATCH_TURNS_CEILING = 20_000

#: Validation errors reported per response; the rest are counted (a body of many wrong items
#: would otherwise get an answer tens of times its own size).
MAX_REPORTED_ERRORS = 10


class _Strict(BaseModel):
    # strict: a number is not a string, a string is not a number; extra fields are a typo.
    model_config = ConfigDict(strict=True, extra="forbid")


def _valid_unicode(value: str) -> str:
    # JSON may carry lone surrogates ("\\ud800"): not text, and no tokenizer can encode them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return value


class TurnIn(_Strict):
    speaker: str = Field(
        min_length=1, description="Speaker name; numbered Speaker_0, Speaker_1, ... by first appearance."
    )
    text: str = Field(min_length=1, description="What the speaker said.")

    @field_validator("speaker", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return _valid_unicode(value)


class DialogueIn(_Strict):
    id: str | None = Field(default=None, max_length=256, description="Caller's dialogue id, echoed back.")
    turns: list[TurnIn] = Field(
        min_length=1, max_length=TURNS_CEILING, description="The dialogue so far, oldest first."
    )

    @field_validator("id")
    @classmethod
    def _id_text(cls, value: str | None) -> str | None:
        return None if value is None else _valid_unicode(value)


def _check_label_set(value: str | None) -> str | None:
    if value is not None and value not in LABEL_SETS:
        # The input is not echoed (it may be anything); the known names are.
        raise ValueError(f"unknown label set; known: {', '.join(LABEL_SETS)}")
    return value


class PredictRequest(_Strict):
    dialogue: DialogueIn
    target: int | None = Field(default=None, description="Index of the turn to classify; default: the last turn.")
    label_set: str | None = Field(
        default=None,
        description="meld, iemocap or emorynlp; default: the model's. A label set the model does not serve "
        "(not trained on it, or its index is missing) gets a 422 saying which; /ready lists those served.",
    )
    debug: bool = Field(default=False, description="Also return the rendered prompt and the retrieved demonstrations.")

    _label_set = field_validator("label_set")(_check_label_set)


class PredictDialogueRequest(_Strict):
    dialogues: list[DialogueIn] = Field(min_length=1, max_length=DIALOGUES_CEILING)
    label_set: str | None = Field(
        default=None,
        description="meld, iemocap or emorynlp; default: the model's. A label set the model does not serve "
        "(not trained on it, or its index is missing) gets a 422 saying which; /ready lists those served.",
    )

    _label_set = field_validator("label_set")(_check_label_set)

    @model_validator(mode="before")
    @classmethod
    def _total_turns_under_ceiling(cls, data: Any) -> Any:
        # Runs on the raw JSON, before a single turn is validated; a malformed shape falls
        # through to the field validation, which reports it.
        dialogues = data.get("dialogues") if isinstance(data, dict) else None
        if isinstance(dialogues, list) and len(dialogues) <= DIALOGUES_CEILING:
            total = sum(len(d["turns"]) for d in dialogues if isinstance(d, dict) and isinstance(d.get("turns"), list))
            if total > BATCH_TURNS_CEILING:
                raise ValueError(
                    f"dialogues hold {total} turns in all, over the ceiling of {BATCH_TURNS_CEILING} per request"
                )
        return data


class Prediction(BaseModel):
    label: str = Field(description="The most probable label.")
    scores: dict[str, float] = Field(description="Probability of every label of the set; they sum to 1.")


class DemonstrationOut(BaseModel):
    text: str
    label: str
    dialogue_id: str
    score: float = Field(description="Cosine similarity to the classified utterance.")


class PredictResponse(Prediction):
    id: str | None = Field(default=None, description="The dialogue's id, when it had one.")
    target: int
    label_set: str
    model: str
    prompt: str | None = None
    demonstrations: list[DemonstrationOut] | None = None


class DialogueResult(BaseModel):
    id: str | None
    predictions: list[Prediction]


class PredictDialogueResponse(BaseModel):
    results: list[DialogueResult]
    label_set: str
    model: str


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
    label_sets: list[str] | None = Field(default=None, description="Label sets served (on /ready), the default first.")
