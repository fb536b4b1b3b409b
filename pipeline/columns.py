"""Column names shared by the reader, the stages and the sinks.

A row travels through the whole dataset as one record: the prepare step adds the key, seed and validation
result, each model stage adds its outputs, the sink splits good rows (images, embeddings, metadata) from
error rows. Rows that failed validation or a stage keep flowing with ``error`` set, so that
rows in == rows written + error rows holds without a second pass over the input.
"""

# Input columns we interpret (README.md, "Generating": the input table). Everything else passes through.
PROMPT = "prompt"
ID = "id"
SEED = "seed"
NEGATIVE_PROMPT = "negative_prompt"
PRIOR_GUIDANCE_SCALE = "prior_guidance_scale"
DECODER_GUIDANCE_SCALE = "decoder_guidance_scale"
INPUT_COLUMNS = (PROMPT, ID, SEED, NEGATIVE_PROMPT, PRIOR_GUIDANCE_SCALE, DECODER_GUIDANCE_SCALE)

# Added by the reader: where the row came from (relative source path, 0-based row index in that file), and why
# its data pages could not be decoded (null for rows read); prepare turns such rows into error rows.
SOURCE = "source"
SOURCE_ROW = "source_row"
READ_ERROR = "__read_error"
# Added by the reader for prepare, which consumes them: where the first row with this row's key was read, for a
# row repeating an earlier row's key (pipeline.duplicates); null for the rest. Only when the input has ids.
FIRST_HOLDER_SOURCE = "__first_holder_source"
FIRST_HOLDER_ROW = "__first_holder_row"
# With --images-per-prompt N > 1: which of the row's N images are already committed (list<int32>), for resume.
DONE_SAMPLES = "__done_samples"

# Added by prepare.
KEY = "key"  # str, unique in the run, safe as a file-name stem (no '/', no '.')
ERROR = "error"  # str: "" for a good row, else the reason
ERROR_STAGE = "error_stage"  # str: "" or the step that rejected the row ("prepare", "prior", ...)

# Added after prepare with --images-per-prompt N > 1 (pipeline.schema.expand_samples): which of the row's N images
# this is, 0-based (int32). Runs of one image per row do not have it.
SAMPLE_INDEX = "sample_index"

# Added by the model stages. Internal hand-off columns start with "__" and are never written out.
PROMPT_TRUNCATED = "prompt_truncated"  # bool: the prompt exceeded 77 CLIP tokens and was truncated
TEXT_EMB = "text_emb"  # (B, D) float32, CLIP text embedding of the prompt
IMAGE_EMB = "img_emb"  # (B, D) float32, the prior's (un-normalised) CLIP image embedding
IMAGE = "image"  # (B, H, W, 3) uint8, the final image; after the encode step, each row's image file (bytes)
TEXT_HIDDEN = "__text_hidden"  # (B, 77, W) float32
TEXT_MASK = "__text_mask"  # (B, 77) bool
NEG_TEXT_EMB = "__neg_text_emb"  # (B, D) float32, encoding of the negative prompt ("" by default)
NEG_TEXT_HIDDEN = "__neg_text_hidden"  # (B, 77, W) float32
NEG_TEXT_MASK = "__neg_text_mask"  # (B, 77) bool
IMAGE_64 = "__image_64"  # (B, 3, 64, 64) float32 in [-1, 1], decoder output
RNG_STATE = "__rng_state"  # (B, S) uint8, each row's torch.Generator state after the previous stage

# Image variations (pipeline.variations): the input image, as prepare found it.
SOURCE_IMAGE = "__source_image"  # bytes of the encoded input image
SOURCE_IMAGE_PATH = "source_image"  # str or null: the input image's path or URL, or the name stored with its bytes

# Image-to-image (pipeline.init_images): input columns of prompt tables, and what prepare makes of them.
INIT_IMAGE_INPUT = "init_image"  # bytes, Hugging Face Image struct or path/URL; null: text-to-image
STRENGTH = "strength"  # float in (0, 1] or null (the run's --strength); written: null for text-to-image rows
INIT_IMAGE = "__init_image"  # bytes of the encoded init image, b"" for none
INIT_IMAGE_PATH = "init_image_path"  # str or null: the init image's path or URL, or the name stored with its bytes
DECODER_STEPS_RUN = "decoder_steps_run"  # int: the decoder steps the row ran (fewer than decoder_steps below 1)

# Added by the optional CLIP score stage (pipeline.scoring).
CLIP_IMAGE_EMB = "clip_img_emb"  # (B, P) float32, L2-normalised CLIP embedding of the generated image
CLIP_SCORE = "clip_score"  # float32, cosine of clip_img_emb with the reference embedding (the prompt's text_emb)
# Curation scores of the same stage, each only with its model: LAION's aesthetic predictor and the Stable Diffusion
# safety checker (pipeline.scoring).
AESTHETIC_SCORE = "aesthetic_score"  # float32
NSFW = "nsfw"  # bool: the safety checker flags the image
NSFW_CONCEPT_SCORES = "nsfw_concept_scores"  # (B, 17) float32: score minus threshold per concept; > 0 flags it
NSFW_SPECIAL_CARE_SCORES = "nsfw_special_care_scores"  # (B, 3) float32: the same for the special-care concepts
# Written to rejected/ only: why the row was filtered ("clip_score < 0.2", "aesthetic_score < 5", "nsfw"; "; "-joined).
REJECTED_REASON = "rejected_reason"

# Columns a user table may not carry, because the pipeline writes them.
RESERVED = (SOURCE, SOURCE_ROW, KEY, PROMPT_TRUNCATED, ERROR, ERROR_STAGE, TEXT_EMB, IMAGE_EMB, IMAGE,
            SOURCE_IMAGE_PATH, INIT_IMAGE_PATH, DECODER_STEPS_RUN, CLIP_IMAGE_EMB, CLIP_SCORE, AESTHETIC_SCORE, NSFW,
            NSFW_CONCEPT_SCORES, NSFW_SPECIAL_CARE_SCORES, REJECTED_REASON)


def is_internal(name: str) -> bool:
    """Hand-off columns between stages; sinks drop them."""
    return name.startswith("__")
