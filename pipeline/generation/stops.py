"""Stop strings (lm-evaluation-harness's `until`): end a generation early once its text holds one, and cut
the text there.

The engine asks `StopStrings` after each decode step which live rows now hold a stop string (it checks EOS
at the same point), so a row stops as soon as its text does; `cut_at_stops` then cuts the text before the
first stop string, as lm-eval's Hugging Face model does (`s.split(term)[0]` for every term, in order).
The generated token ids, and so a row's cost, keep the tokens that spelled the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StopStrings:
    """Callable for `generate(stop=...)`: tokens (R, T) of the live rows -> (R,) bool, True where the text
    decoded from the row's tokens (special tokens skipped, as the output text is) contains a stop string.

    Only the last tokens are decoded: a token decodes to at least one character (a partial UTF-8 byte to
    U+FFFD), so a stop string of n characters lies within the last n + 1 tokens of the step that completes it.
    """

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        self.window = max((len(s) for s in self.strings), default=0) + 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tails = tokens[:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.strings) for text in texts], dtype=torch.bool,
                            device=tokens.device)


def cut_at_stops(text: str, strings: Sequence[str]) -> tuple[str, bool]:
    """`text` before its first stop string (lm-eval's rule), and whether one was found."""
    cut = text
    for term in strings:
        if term:
            cut = cut.split(term)[0]
    return cut, cut != text
