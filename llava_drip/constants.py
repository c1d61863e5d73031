"""Constants shared with LLaVA's formats (users' data and checkpoints depend on these values)."""
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # sentinel spliced into input_ids where an image's visual tokens go
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"  # mm_use_im_patch_token / mm_use_im_start_end (not used by LLaVA-1.5)
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
CONTROLLER_HEART_BEAT_EXPIRATION = 30
