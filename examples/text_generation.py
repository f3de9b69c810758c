"""Text generated token by token, streamed: a GPT-2-style model behind ``predict_stream``.

The model is built from a ``transformers`` config with random weights (seeded),
so the example runs offline with nothing to download; its text is gibberish,
but the serving path is the one a trained checkpoint takes. The tokenizer is a
character-level one (printable ASCII): a Hugging Face BPE tokenizer needs its
vocabulary files, and one character per token makes each streamed event easy
to see. Swap in ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` for a real model; nothing else changes::

    torchpool serve --handler examples.text_generation:TextGenerator \\
        --model-kwargs '{"max_new_tokens": 64}' --model-name gpt

    curl -N localhost:8000/predict -H 'Accept: text/event-stream' \\
        -H 'content-type: application/json' -d '{"input_tensor": "Once upon a time"}'
    curl -N localhost:8000/v2/models/gpt/generate_stream -d '{"text_input": "Once upon"}'

The same model answers the OpenAI API's ``/v1/chat/completions`` and ``/v1/completions``
(it declares ``openai_routes``): the worker renders the messages with the tokenizer's
chat template, as it would a real model's, and ``max_tokens``, ``temperature``,
``top_p`` and ``seed`` reach ``predict_stream``::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    for chunk in client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "Hi"}], stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="")

Each event is one new character (``{"output": "e"}``, or ``{"text_output": "e"}``
from ``generate_stream``); ``/v2/models/gpt/generate`` answers the whole text at once.
Generation samples from the model with a generator seeded per request, so the
same prompt always gives the same text. A generate request's ``parameters`` may
set ``max_new_tokens`` (up to the server's), ``temperature`` and ``seed`` for
that request: ``{"text_input": "Once upon", "parameters": {"max_new_tokens": 8}}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Final

import torch

# Printable ASCII and the newline: one token each.
VOCAB: Final = "\n" + "".join(chr(code) for code in range(32, 127))
_IDS: Final = {char: index for index, char in enumerate(VOCAB)}


# ChatML-like, in Jinja as a Hugging Face tokenizer's chat_template is written.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def encode(text: str) -> list[int]:
    """Characters -> token ids; a character outside the vocabulary is refused."""
    unknown = sorted({char for char in text if char not in _IDS})
    if unknown:
        raise ValueError(f"characters outside printable ASCII: {unknown[:5]}")
    return [_IDS[char] for char in text]


class CharTokenizer:
    """One token per character, with a chat template that ``apply_chat_template`` renders
    the way a ``transformers`` tokenizer does (what the worker calls for chat)."""

    chat_template = CHAT_TEMPLATE

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        return encode(text) if tokenize else text


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> Any:
    """The next token: greedy at temperature 0, else from the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (always the first).
        outside = ordered.cumsum(dim=-1) - ordered > top_p
        probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator)


class TextGenerator:
    """``--model-kwargs``: ``max_new_tokens`` (32), ``n_layer`` (2), ``n_embd`` (64),
    ``n_head`` (2), ``n_positions`` (256), ``temperature`` (1.0), ``seed`` (0)."""

    input_shape = (-1,)
    input_dtype = "int64"
    # The OpenAI API: the routes it serves, the sampling parameters predict_stream reads.
    openai_routes = ("chat", "completions")
    openai_parameters = ("max_tokens", "temperature", "top_p", "seed")
    tokenizer = CharTokenizer()

    def __init__(
        self,
        max_new_tokens: int = 32,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 2,
        n_positions: int = 256,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0 < max_new_tokens < n_positions:
            raise ValueError(f"max_new_tokens must be in 1..{n_positions - 1}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.n_positions = n_positions
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.model: Any = None
        self.cache_arg = "past_key_values"
        self.device = torch.device("cpu")

    def load(self, device: torch.device) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(VOCAB),
            n_positions=self.n_positions,
            bos_token_id=None,
            eos_token_id=None,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = GPT2LMHeadModel(config)
        self.model.to(device).eval()
        self.device = device
        # transformers 5 renamed the attention cache argument; older releases take the old name.
        names = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in names else "past_key_values"

    def preprocess(self, payload: Any) -> torch.Tensor:
        """A prompt string -> its token ids, one row; only the last characters that fit."""
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8")
        if not isinstance(payload, str) or not payload:
            raise ValueError('send a prompt: {"input_tensor": "Once upon a time"}')
        ids = encode(payload)[-(self.n_positions - self.max_new_tokens) :]
        return torch.tensor([ids], dtype=torch.int64)

    def predict_stream(self, ids: torch.Tensor, parameters: dict[str, Any]) -> Iterator[str]:
        """One character per step, reusing the attention cache (one token in per step).

        ``parameters``: a generate request's ``max_new_tokens``, or the OpenAI API's
        ``max_tokens``; ``temperature``, ``top_p`` and ``seed``.
        """
        # The prompt was cut to leave room for the server's max_new_tokens: never more.
        asked = parameters.get("max_tokens", parameters.get("max_new_tokens", self.max_new_tokens))
        steps = min(int(asked), self.max_new_tokens)
        temperature = float(parameters.get("temperature", self.temperature))
        top_p = float(parameters.get("top_p", 1.0))
        seed = int(parameters.get("seed", self.seed))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache: dict[str, Any] = {}
        step = ids[:1]
        for _ in range(steps):
            out = self.model(input_ids=step, use_cache=True, **cache)
            cache = {self.cache_arg: out[self.cache_arg]}
            step = _sample(out.logits[:, -1], temperature, top_p, generator)
            yield VOCAB[int(step)]
