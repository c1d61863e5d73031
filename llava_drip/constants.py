"""Constants shared with LLaVA's formats (users' data and checkpoints depend on these values)."""
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # sentinel spliced into input_ids where an image's visual tokens go
DEFAULT_IMAGE_TOKEN = "<image>"
CONTROLLER_HEART_BEAT_EXPIRATION = 30
