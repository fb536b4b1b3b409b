"""``karlo convert-original``: kakaobrain's original checkpoints -> a diffusers-layout repo for ``--model``."""

from __future__ import annotations

import sys

import click

_FILE = dict(required=True, metavar="FILE|URL")


@click.command("convert-original")
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--prior", **_FILE, help="prior-ckpt-step=01000000-of-01000000.ckpt")
@click.option("--decoder", **_FILE, help="decoder-ckpt-step=01000000-of-01000000.ckpt")
@click.option("--super-res", **_FILE, help="improved-sr-ckpt-step=1.2M.ckpt")
@click.option("--clip-stats", **_FILE, help="ViT-L-14_stats.th")
@click.option("--text-encoder", required=True, metavar="DIR|URL",
              help="CLIP ViT-L/14 in the Hugging Face layout (openai/clip-vit-large-patch14 as downloaded), or the "
                   "root of a diffusers-format Karlo repo, whose text_encoder/ and tokenizer/ are copied.")
# Head sizes are not recorded in the weights; without the options they come from the original yaml configs
# (karlo_model.original.KARLO_PRIOR_HEADS, KARLO_ATTENTION_HEAD_DIM). Read there, not here: torch loads slowly.
@click.option("--prior-num-heads", type=click.IntRange(min=1), default=None,
              help="Attention heads of the prior [default: 32, the original yaml's xf_heads].")
@click.option("--attention-head-dim", type=click.IntRange(min=1), default=None,
              help="Channels per attention head of the decoder [default: 64, the original yaml's "
                   "num_head_channels].")
def convert_original_cmd(out_dir, prior, decoder, super_res, clip_stats, text_encoder, prior_num_heads,
                         attention_head_dim) -> None:
    """Convert the original Karlo checkpoints to a diffusers-layout repo in OUT that samples as the original
    sampler does (prior x0 clamp 10, float64 schedule tables; see docs/original-checkpoints.md)."""
    from karlo_model.convert import convert_original

    heads = dict(prior_num_heads=prior_num_heads, attention_head_dim=attention_head_dim)
    try:
        path = convert_original(prior, decoder, super_res, clip_stats, text_encoder, out_dir,
                                **{k: v for k, v in heads.items() if v is not None})
    except (ValueError, FileNotFoundError) as e:  # WeightsError, CheckpointError and ConfigError are ValueErrors
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(f"wrote a Karlo repo with the original sampling to {path}; use it with `karlo generate --model {path}`")
