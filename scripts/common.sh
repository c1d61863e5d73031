# Sourced by pretrain.sh, finetune.sh and finetune_lora.sh. Each default is LLaVA-1.5's (or DRIP's);
# the tests swap in tiny stand-ins through these variables and run the very same flags on CPU.
#   LLM            base LLM (HF id or folder)                  default lmsys/vicuna-7b-v1.5
#   VISION_TOWER   DRIP / open_clip name, or HF CLIP id/folder default DRIP-4x-16 (DRIP_TOWER is an alias)
#   DRIP_CKPT      clip-train checkpoint of a DRIP / open_clip tower (not used for an HF CLIP tower)
#   SELECT_LAYER   --mm_vision_select_layer                    default -1 (DRIP's last block; LLaVA's CLIP: -2)
#   DATA_PATH, IMAGE_FOLDER, PROJECTOR, OUT                    LLaVA-1.5's playground/checkpoints paths
#   NUM_GPUS       ranks for the deepspeed launcher            default: every visible GPU
#   MAX_STEPS      stop after this many optimizer steps        default: the full epoch
#   REPORT_TO      wandb | tensorboard | none                  default wandb (LLaVA-1.5's)
#   DEEPSPEED      the launcher                                default deepspeed
# Extra arguments to a script are appended to its flags.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-${DRIP_TOWER:-DRIP-4x-16}}
DRIP_CKPT=${DRIP_CKPT:-}
SELECT_LAYER=${SELECT_LAYER:--1}
REPORT_TO=${REPORT_TO:-wandb}
DEEPSPEED=${DEEPSPEED:-deepspeed}
TAG=llava-v1.5-$(basename "$LLM" | sed 's/-v1.5//')-$(basename "$VISION_TOWER")
LAUNCH=(); [ -n "${NUM_GPUS:-}" ] && LAUNCH+=(--num_gpus "$NUM_GPUS")
[ -n "${MASTER_PORT:-}" ] && LAUNCH+=(--master_port "$MASTER_PORT")
TOWER_ARGS=(--vision_tower "$VISION_TOWER"); [ -n "$DRIP_CKPT" ] && TOWER_ARGS+=(--vision_tower_pretrained "$DRIP_CKPT")
EXTRA=(); [ -n "${MAX_STEPS:-}" ] && EXTRA+=(--max_steps "$MAX_STEPS")
