"""DeepFloyd IF's text conditioning: T5-XXL's last hidden states of 77 tokens.

As ``IFPipeline.encode_prompt`` without caption cleaning: the prompt lower-cased and stripped,
tokenized to 77 tokens (EOS, then padding), encoded with the padding masked out of T5's
attention; the padded positions' states are kept (the UNet sees all 77). The negative prompt
("" when none) is encoded the same way. A1111 emphasis and prompt editing are not read here.
"""

from __future__ import annotations

import torch

from danqing.sampling.loop import Conditioning, ConditioningSchedule

IF_TOKENS = 77  # max_length of the IF pipelines


@torch.no_grad()
def if_embeddings(encoder, tokenizer, text: str) -> torch.Tensor:
    """(1, 77, d_model) T5 hidden states of one prompt."""
    tokens = tokenizer(text.lower().strip(), padding="max_length", max_length=IF_TOKENS, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = encoder.device
    return encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]


def if_schedule(encoder, tokenizer, prompt: str | list[str], negative: str, batch: int, steps: int,
                use_cfg: bool) -> ConditioningSchedule:
    """The conditioning of ``batch`` images, [negative; prompt] rows when ``use_cfg``; ``prompt``
    one for all, or a list of ``batch`` (one per image)."""
    if isinstance(prompt, str):
        pos = if_embeddings(encoder, tokenizer, prompt).expand(batch, -1, -1)
    else:
        if len(prompt) != batch:
            raise ValueError(f"{len(prompt)} prompts for {batch} images")
        pos = torch.cat([if_embeddings(encoder, tokenizer, p) for p in prompt])
    context = torch.cat([if_embeddings(encoder, tokenizer, negative).expand(batch, -1, -1), pos]) if use_cfg else pos
    return ConditioningSchedule([steps], [Conditioning(context)])
