"""Multiple-choice prompts and their token ids: the lettered prompt and its answer-letter tokens ("letters"),
the cloze prompt and each answer's continuation tokens ("cloze"). What the two formulations score and why is
in `moetune/eval/mmlu.py`, which runs the model on them. Torch-free.
"""
from __future__ import annotations

from typing import Any

from moetune.data.mmlu import LETTERS


def resolve_chat(tokenizer: Any, use_chat_template: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    return has_template if use_chat_template is None else bool(use_chat_template)


def format_mc_prompt(row: dict, tokenizer: Any = None, use_chat_template: bool | None = None) -> str:
    """The standard zero-shot MMLU prompt for one question.

    Plain text (question and choices are stripped of surrounding whitespace; the subject id
    is shown with spaces)::

        The following is a multiple choice question about high school biology.

        <question>
        A. <choice 0>
        B. <choice 1>
        C. <choice 2>
        D. <choice 3>
        Answer:

    With a chat template (``use_chat_template=True``, or ``None`` and the tokenizer has one)
    that text becomes the content of a single user message, rendered with
    ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``; template defaults
    (e.g. a default system prompt) are kept. The assistant's reply is then expected to start
    directly with the letter. Without a chat template the answer is expected as " A" after
    "Answer:".
    """
    subject = row.get("subject", "").replace("_", " ").strip()
    about = f" about {subject}" if subject else ""
    lines = [f"The following is a multiple choice question{about}.", "", row["question"].strip()]
    lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, row["choices"])]
    text = "\n".join(lines) + "\nAnswer:"
    if tokenizer is None or not resolve_chat(tokenizer, use_chat_template):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def letter_token_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token id of each answer letter *as it would be tokenized right after* ``prompt``.

    The continuation is ``" A"`` for plain prompts (after "Answer:") and ``"A"`` after a chat
    generation prompt. We tokenize ``prompt + continuation`` and take the first token past the
    prompt's tokens, so BPE (" A" -> "ĠA"), SentencePiece ("▁A") and word-level tokenizers are
    all handled. If the continuation merges with the prompt's last token, we fall back to the
    last token of the continuation tokenized alone.
    """
    sep = "" if chat else " "
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(prompt + sep + letter, add_special_tokens=False)["input_ids"]
        if len(full) > len(prompt_ids) and full[:len(prompt_ids)] == prompt_ids:
            ids.append(full[len(prompt_ids)])
        else:
            ids.append(tokenizer(sep + letter, add_special_tokens=False)["input_ids"][-1])
    if len(set(ids)) != 4:
        raise ValueError(f"answer letters do not map to 4 distinct tokens: {ids}")
    return ids


def format_cloze_prompt(row: dict, tokenizer: Any = None, use_chat_template: bool = False) -> str:
    """The zero-shot cloze prompt for one question: the question without its options.

    Plain text, as ``mmlu_cloze_prompt`` of the SmolLM2 evaluation tasks (question stripped of
    surrounding whitespace; the subject line is left out when the row has no subject)::

        The following are questions about high school biology.
        Question: <question>
        Answer:

    Each choice is then scored as the continuation ``" <choice>"`` (see ``cloze_continuations``).
    Unlike ``format_mc_prompt``, the default is *no* chat template (lighteval's default). With
    ``use_chat_template=True`` the text becomes a single user message rendered with
    ``add_generation_prompt=True`` (template defaults such as a default system prompt kept), as
    lighteval's ``--use-chat-template`` does for a zero-shot task; the continuation keeps its
    leading space there too, as in lighteval.
    """
    subject = row.get("subject", "").replace("_", " ").strip()
    header = f"The following are questions about {subject}.\n" if subject else ""
    text = f"{header}Question: {row['question'].strip()}\nAnswer:"
    if tokenizer is None or not use_chat_template:
        return text
    resolve_chat(tokenizer, True)  # raises if there is no template
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def cloze_continuations(row: dict) -> list[str]:
    """The 4 scored continuations ``" <choice>"`` (choice texts stripped of surrounding
    whitespace), with or without a chat template, as lighteval's ``Doc.choices``."""
    return [" " + choice.strip() for choice in row["choices"]]


def special_prefix(tokenizer: Any, prompt: str, plain_ids: list[int]) -> list[int]:
    """Special tokens the tokenizer puts *before* ``prompt`` (e.g. ``[BOS]``; often none).

    ``plain_ids`` is ``prompt`` tokenized without specials; whatever precedes it in the
    tokenization with specials is the prefix. Trailing specials (e.g. an EOS) are not kept.
    """
    with_specials = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    for start in range(len(with_specials) - len(plain_ids) + 1):
        if with_specials[start:start + len(plain_ids)] == plain_ids:
            return with_specials[:start]
    return []


def cloze_token_ids(tokenizer: Any, prompt: str, continuation: str,
                    prefix: Sequence[int] = ()) -> tuple[list[int], int]:
    """``(ids, n)``: the tokens of ``prefix + prompt + continuation`` and how many of the last
    ones are scored as the continuation.

    ``prompt + continuation`` is tokenized as one string (so the continuation's tokens are the
    ones the model would really see after the prompt), and the boundary is the first token
    that differs from the prompt tokenized alone. Normally that is exactly ``len(prompt
    tokens)`` (lighteval's ``tok_encode_pair`` assumes so). If the tokenizer merges across the
    boundary (e.g. a prompt ending in "b" and a continuation starting with "c" become one
    token "bc"), the merged token and everything after it form the continuation: the scored
    tokens then also cover the merged prompt characters, but no token is split or dropped.
    ``prefix`` (leading special tokens, see ``special_prefix``) is prepended unscored.
    """
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
        common += 1
    if common == len(whole):
        raise ValueError(f"continuation {continuation!r} adds no tokens after the prompt")
    if common == 0 and not prefix:
        raise ValueError("nothing precedes the continuation: the first token cannot be scored")
    return list(prefix) + whole, len(whole) - common
