"""VQA by an answer classifier (built-in families): the bundle's `vqa` task ends in a module of
role `answer_classifier`, which maps (question, image features) to `answer_probs` (n, n_answers);
its `extra["answers"]` lists the answer texts in class order.

Each Answer is an answer text of the set, with `score` its probability and `token_ids` the text's
ids (no special tokens). `num_return_sequences=k` returns the k most probable answers, best first
(ties: the lower class index first); the other decoding options are checked and have no effect.
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError
from .state import run_modules


def classify(model, module: str, values: dict, options: dict, timings: dict) -> list:
    from .model import Answer

    k = options.get("num_return_sequences") or 1
    model._options(1, None, {**options, "num_beams": max(k, options.get("num_beams") or 1)})  # validates
    answers = model.bundle.module(module).extra.get("answers")
    probs = run_modules(model, [module], values, timings)["answer_probs"]
    if not isinstance(answers, list) or len(answers) != probs.shape[1]:
        raise BundleError(f"bundle {model.bundle.path}: module {module} gives {probs.shape[1]} answer "
                          f"probabilities but its extra['answers'] lists {len(answers or [])} answers")
    model.last_timings = timings
    out = []
    for row in probs:
        best = np.argsort(-row, kind="stable")[:k]
        picked = [Answer(answers[i], model.tokenizer.encode(answers[i], add_special_tokens=False),
                         float(row[i])) for i in best]
        out.append(picked if k > 1 else picked[0])
    return out
