#!/usr/bin/env bash
# DeepSeek-V3 pretraining launcher for dsv3: the Intel Gaudi Megatron-LM script examples/deepseek/pretrain_deepseek.sh
# (every HL_* variable, its default and its checks), running `dsv3 train` in place of `python pretrain_gpt.py`
# with the seed's command line unchanged: dsv3 train takes every flag the seed passes (it lists those that have no
# effect in dsv3 in one start-up line). See examples/deepseek/README.md.
#
# Differences from the seed script:
#   * HL_AUX_LOSS_COEFF is honoured (the seed hard-codes 1e-4) and HL_KILL_SWITCH is an alias of
#     HL_KILL_SWITCH_FILE (the seed's README and script disagree on the name).
#   * Extra variables for small machines replace the seed's hard-coded values in place: HL_HIDDEN_SIZE,
#     HL_NUM_EXPERTS, ... and HL_LR/HL_MIN_LR/HL_LR_WARMUP_ITERS (listed below). HL_MODEL_CONFIG adds
#     --model-config (an HF config.json) and leaves out the hard-coded shapes the file decides. HL_NORM_EPS,
#     HL_MTP_*, HL_SPLIT, HL_SEED and HL_EXTRA_ARGS append flags after the seed's. HL_DSV3_BIN, HL_DRY_RUN.
#   * World size 1 runs dsv3 directly (no mpirun). Larger worlds run the seed's mpirun command; the CPU settings
#     ride on the seed's own mechanisms: OMP_NUM_THREADS as an ENV_FLAGS item, and OpenMPI's oversubscription
#     (more ranks than cores) as OMPI_MCA_rmaps_base_oversubscribe=1 in mpirun's environment. torchrun is refused
#     (dsv3 ranks talk over MPI). Gaudi-only environment settings (lazy mode, host NIC) are reported as not
#     applicable.
set -euo pipefail

DSV3_ROOT=$(realpath "$(dirname "$0")"/../..)
SELF=pretrain_deepseek.sh

note() { echo "${SELF}: note: $*" >&2; }
# The seed's checks print their message on stdout and exit; dsv3's own refusals go to stderr.
seed_fail() { echo "$1"; exit "${2:-1}"; }
fail() { echo "${SELF}: error: $*" >&2; exit 1; }
is_set() { [[ -n "${!1+x}" ]]; }
check_int() { [[ "${!1:-}" =~ ^[0-9]+$ ]] || fail "$1=${!1:-} must be a non-negative integer"; }

DRY_RUN=${HL_DRY_RUN:-0}
DSV3_BIN=${HL_DSV3_BIN:-${DSV3_ROOT}/build/dsv3}

# ---------------------------------------------------------------------------------------------------------------
# The seed's variables, same names and defaults.
LAUNCHER_TYPE=${HL_LAUNCHER_TYPE:-mpirun}
DATA_DIR=${HL_DATA_DIR_ROOT:-/data/dataset_idx/red_pajama_deepseek}
DATA_CACHE_DIR=${HL_DATA_CACHE_DIR:-}
DATA_FILE_PREFIX=${HL_DATA_FILE_PREFIX:-rp_wiki_24B_deepseek_tok_text_document}
TOKENIZER_TYPE=${HL_TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${HL_TOKENIZER_MODEL:-}
TRANSFORMER_IMPL=${HL_TRANSFORMER_IMPL:-transformer_engine}

NUM_NODES=${HL_NUM_NODES:-1}
SSH_PORT=${HL_SSH_PORT:-22}
HNIC=${HL_HNIC:-0}
if [[ "${HNIC}" = "1" ]] && [[ "${NUM_NODES}" -le 1 ]]; then
  seed_fail "Exiting: Host NIC is enabled and NUM_NODES is not greater than 1"
fi
if [[ "${HNIC}" = "1" ]]; then
  HCCL_OVER_OFI=${HL_HCCL_OVER_OFI:-1}
  HCCL_GAUDI_DIRECT=${HL_HCCL_GAUDI_DIRECT:-1}
  FI_PROVIDER=${HL_FI_PROVIDER:-verbs}
fi

TP=${HL_TP:-2}
PP=${HL_PP:-2}
DP=${HL_DP:-2}
EP=${HL_EP:-2}
MICRO_BATCH_SIZE=${HL_MICRO_BATCH:-1}
GLOBAL_BATCH_SIZE=${HL_GBS:-3072}
SEQ_LEN=${HL_SEQ_LEN:-4096}
TRAIN_ITERS=${HL_TRAIN_ITERS:-500000}
LR_DECAY_ITER=${HL_LR_DECAY_ITER:-320000}
EXIT_INTERVAL=${HL_EXIT_INTERVAL:-0}
OUTPUT_DIR=${HL_RESULTS_DIR:-}
OUTPUT_DIR_PREFIX=${HL_RESULTS_DIR_PREFIX:-.}
CHECKPOINT_SAVE=${HL_SAVE:-1}
SAVE_INTERVAL=${HL_SAVE_INTERVAL:-2000}
CKPT_FORMAT=${HL_CKPT_FORMAT:-torch_dist}
USE_DISTRIBUTED_OPTIMIZER=${HL_USE_DISTRIBUTED_OPTIMIZER:-1}
SAVE_DISTRIB_OPTIMIZER_METHOD=${HL_SAVE_DISTRIB_OPTIMIZER_METHOD:-parallel_multi_node}
LOAD_DISTRIB_OPTIMIZER_METHOD=${HL_LOAD_DISTRIB_OPTIMIZER_METHOD:-serial_per_node}
LOAD_DIR=${HL_LOAD_DIR:-}
CHECKPOINTS_DIR=${HL_CHECKPOINTS_DIR:-}
VERIFY_CKPT=${HL_VERIFY_CKPT:-0}
TENSORBOARD_DIR=${HL_TENSORBOARD_DIR:-}
# The seed's README names it HL_KILL_SWITCH, its script HL_KILL_SWITCH_FILE: both are read here.
if is_set HL_KILL_SWITCH_FILE && is_set HL_KILL_SWITCH && [[ "${HL_KILL_SWITCH_FILE}" != "${HL_KILL_SWITCH}" ]]; then
  fail "HL_KILL_SWITCH (${HL_KILL_SWITCH}) and HL_KILL_SWITCH_FILE (${HL_KILL_SWITCH_FILE}) differ; set one of them"
fi
KILL_SWITCH_FILE=${HL_KILL_SWITCH_FILE:-${HL_KILL_SWITCH:-}}
HOSTSFILE=${HL_HOSTSFILE:-}
CKP_ACT=${HL_CKP_ACT:-0}
RECOMPUTE_NUM_LAYERS=${HL_RECOMPUTE_NUM_LAYERS:-1}
LOG_INTERVAL=${HL_LOG_INTERVAL:-10}
DEVICES_PER_NODE=${HL_DEVICES_PER_NODE:-8}
SEQ_PARALLEL=${HL_SEQ_PARALLEL:-1}
OPTIMIZER=${HL_OPTIMIZER:-fusedadamw}
DROPOUT=${HL_DROPOUT:-0.0}
EVAL_ITERS=${HL_EVAL_ITERS:-10}
EVAL_INTERVAL=${HL_EVAL_INTERVAL:-1000}
USE_FUSED_SDPA=${HL_USE_FUSED_SDPA:-1}
USE_FUSED_SDPA_WITH_RECOMPUTE=${HL_USE_FUSED_SDPA_WITH_RECOMPUTE:-1}
USE_FAST_SOFTMAX=${HL_USE_FAST_SOFTMAX:-1}
USE_LAZY_MODE=${HL_USE_LAZY_MODE:-0}
USE_TORCH_COMPILE=${HL_USE_TORCH_COMPILE:-0}
USE_TORCH_COMPILED_AUTOGRAD=${HL_USE_TORCH_COMPILED_AUTOGRAD:-0}
USE_FUSED_RMSNORM=${HL_USE_FUSED_RMSNORM:-1}
PROFILE_TYPE=${HL_PROFILE_TYPE:-}
PROFILE_STEP_START=${HL_PROFILE_STEP_START:-3}
PROFILE_STEP_END=${HL_PROFILE_STEP_END:-4}
PROFILE_RANKS=${HL_PROFILE_RANKS:-}
REDIRECT_LOGS=${HL_REDIRECT_LOGS:-0}
DETERMINISTIC_MODE=${HL_DETERMINISTIC_MODE:-0}
TORCHRUN_MULTINODE=${HL_TORCHRUN_MULTINODE:-0}
NUM_WORKERS=${HL_NUM_WORKERS:-2}
ENABLE_PARAM_GATHER_OVERLAP=${HL_ENABLE_PARAM_GATHER_OVERLAP:-0}
ENABLE_GRAD_REDUCE_OVERLAP=${HL_ENABLE_GRAD_REDUCE_OVERLAP:-0}
TOKEN_DROP=${HL_TOKEN_DROP:-0}  # 0: dropless, 1: drop (capacity factor 1.0, probs policy, padded)
TOKEN_DISPATCHER_TYPE=${HL_TOKEN_DISPATCHER_TYPE:-allgather}
MOE_LAYER_RECOMPUTE=${HL_MOE_LAYER_RECOMPUTE:-0}
MOE_GROUPED_GEMM=${HL_MOE_GROUPED_GEMM:-1}
ENABLE_SHARED_EXPERT_OVERLAP=${HL_ENABLE_SHARED_EXPERT_OVERLAP:-0}
MOE_SKIP_FIRST_LAYERS=${HL_MOE_SKIP_FIRST_LAYERS:-3}
FISRT_PP_STAGE_LAYERS=${HL_FISRT_PP_STAGE_LAYERS:-0}  # sic, the seed's spelling
LAST_PP_STAGE_LAYERS=${HL_LAST_PP_STAGE_LAYERS:-0}
AUX_LOSS_COEFF=${HL_AUX_LOSS_COEFF:-1e-4}  # the seed hard-codes 1e-4 and ignores HL_AUX_LOSS_COEFF
EXP_NAME=${EXP_NAME:-default}

for v in NUM_NODES DEVICES_PER_NODE DP TP PP EP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LEN TRAIN_ITERS \
         CKP_ACT TOKEN_DROP MOE_SKIP_FIRST_LAYERS FISRT_PP_STAGE_LAYERS LAST_PP_STAGE_LAYERS CHECKPOINT_SAVE \
         USE_DISTRIBUTED_OPTIMIZER VERIFY_CKPT SEQ_PARALLEL MOE_LAYER_RECOMPUTE MOE_GROUPED_GEMM \
         ENABLE_SHARED_EXPERT_OVERLAP ENABLE_PARAM_GATHER_OVERLAP ENABLE_GRAD_REDUCE_OVERLAP DETERMINISTIC_MODE; do
  check_int "$v"
done

if [[ $((NUM_NODES * DEVICES_PER_NODE)) -ne $((DP * TP * PP)) ]]; then
  seed_fail "NUM_NODES*DEVICES_PER_NODE != DP*TP*PP"
fi

# ---------------------------------------------------------------------------------------------------------------
# Model shape. Without HL_MODEL_CONFIG: the seed's hard-coded DeepSeek-V3 sizes, each overridable by an HL_*
# variable (an extension: the seed cannot change them). With HL_MODEL_CONFIG: the config.json decides, and only
# shape variables the user set are passed (they override the file's values).
MODEL_CONFIG=${HL_MODEL_CONFIG:-}
if [[ -n "${MODEL_CONFIG}" && ! -f "${MODEL_CONFIG}" ]]; then
  fail "HL_MODEL_CONFIG=${MODEL_CONFIG}: no such file"
fi
json_int() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$2" | head -n 1; }
# shape HL_VAR SEED_VALUE: what to pass in place of the seed's hard-coded value — the variable when set, else the
# seed's value, or nothing (the flag is left out) when HL_MODEL_CONFIG decides.
shape() { if is_set "$1"; then echo "${!1}"; elif [[ -z "${MODEL_CONFIG}" ]]; then echo "$2"; fi; }

HIDDEN_SIZE=$(shape HL_HIDDEN_SIZE 7168)
FFN_HIDDEN_SIZE=$(shape HL_FFN_HIDDEN_SIZE 18432)
EXPERT_FFN_HIDDEN_SIZE=$(shape HL_MOE_FFN_HIDDEN_SIZE 2048)
SHARED_EXPERT_FFN_HIDDEN_SIZE=$(shape HL_SHARED_EXPERT_FFN_HIDDEN_SIZE 2048)
NUM_HEADS=$(shape HL_NUM_HEADS 128)
NUM_KV_HEADS=128  # --num-query-groups: ignored without --group-query-attention, as in Megatron
Q_LORA_RANK=$(shape HL_Q_LORA_RANK 1536)
KV_LORA_RANK=$(shape HL_KV_LORA_RANK 512)
QK_HEAD_DIM=$(shape HL_QK_HEAD_DIM 128)
QK_POS_EMB_HEAD_DIM=$(shape HL_QK_POS_EMB_HEAD_DIM 64)
V_HEAD_DIM=$(shape HL_V_HEAD_DIM 128)
NUM_EXPERTS=$(shape HL_NUM_EXPERTS 256)
TOPK=$(shape HL_MOE_ROUTER_TOPK 8)
TOPK_SCALING_FACTOR=$(shape HL_MOE_ROUTER_TOPK_SCALING_FACTOR 2.5)
ROUTER_NUM_GROUPS=$(shape HL_MOE_ROUTER_NUM_GROUPS 8)
ROUTER_GROUP_TOPK=$(shape HL_MOE_ROUTER_GROUP_TOPK 4)
KV_CHANNELS=128  # unused by MLA, as in Megatron
ROTARY_BASE=$(shape HL_ROTARY_BASE 10000)
INIT_STD=$(shape HL_INIT_STD 6e-3)
LR=${HL_LR:-2.2e-4}
MIN_LR=${HL_MIN_LR:-2.2e-5}
ADAM_BETA1=0.9
ADAM_BETA2=0.95
ADAM_EPS=1e-8
LR_WARMUP_ITERS=${HL_LR_WARMUP_ITERS:-2000}

if [[ -n "${MODEL_CONFIG}" ]]; then
  NUM_LAYERS=${HL_NUM_LAYERS:-$(json_int num_hidden_layers "${MODEL_CONFIG}")}
  [[ -n "${NUM_LAYERS}" ]] || fail "HL_MODEL_CONFIG=${MODEL_CONFIG} has no num_hidden_layers"
else
  NUM_LAYERS=${HL_NUM_LAYERS:-61}
fi
check_int NUM_LAYERS

if [[ ${FISRT_PP_STAGE_LAYERS} -eq 0 && ${LAST_PP_STAGE_LAYERS} -eq 0 && $((NUM_LAYERS % PP)) -ne 0 ]]; then
  seed_fail 'HL_NUM_LAYERS must be divisible by PP'
fi

case "${LAUNCHER_TYPE}" in
  mpirun) ;;
  torchrun)
    if [[ "${TORCHRUN_MULTINODE}" -ne 1 ]] && [[ "${NUM_NODES}" -ne 1 ]]; then
      seed_fail "NUM_NODES greater than 1 not supported by torchrun"
    fi
    fail "HL_LAUNCHER_TYPE=torchrun is not supported by dsv3: its ranks communicate over MPI, not torch.distributed," \
         "so processes spawned by torchrun would not find each other. Use HL_LAUNCHER_TYPE=mpirun (the default);" \
         "for several nodes give HL_HOSTSFILE (or /etc/mpi/hostfile) instead of running torchrun on each node."
    ;;
  *) seed_fail "Unsupported launcher type = ${LAUNCHER_TYPE}" 2 ;;
esac

case "${TOKENIZER_TYPE}" in
  HuggingFaceTokenizer) ;;
  GPTSentencePieceTokenizer | Llama2Tokenizer | Llama3Tokenizer | DeepSeekV2Tokenizer | GPT2BPETokenizer)
    fail "HL_TOKENIZER_TYPE=${TOKENIZER_TYPE} is not supported by dsv3 train, which reads HuggingFace tokenizer.json" \
         "directories; use HL_TOKENIZER_TYPE=HuggingFaceTokenizer" ;;
  *) seed_fail "incorrect HL_TOKENIZER_TYPE=${TOKENIZER_TYPE} is set" ;;
esac

if [[ ${TOKEN_DROP} -eq 1 && "${TOKEN_DISPATCHER_TYPE}" != "alltoall" ]]; then
  # Megatron-Core's validation error for the same combination (dsv3 train refuses it too).
  fail "HL_TOKEN_DROP=1 with HL_TOKEN_DISPATCHER_TYPE=${TOKEN_DISPATCHER_TYPE}:" \
       "moe_expert_capacity_factor only works with alltoall token dispatcher"
fi
case "${OPTIMIZER}" in
  fusedadamw | adam | adamw) ;;  # Megatron's adam is AdamW (decoupled weight decay); dsv3 implements that
  *) fail "HL_OPTIMIZER=${OPTIMIZER} is not supported by dsv3 train (it implements AdamW: fusedadamw/adam)" ;;
esac
if ! awk -v d="${DROPOUT}" 'BEGIN { exit !(d + 0 == 0) }'; then
  fail "HL_DROPOUT=${DROPOUT}: dsv3 has no dropout (the seed's default 0.0 is the only supported value)"
fi

# ---------------------------------------------------------------------------------------------------------------
# Output directories (spec: <prefix>/out/deepseek_v3/bf16_<impl>_<exp>_nl.._gb.._mb.._sp.._D.._T.._P.._E.._devices.._<time>).
NUM_DEVICES=$((DEVICES_PER_NODE * NUM_NODES))
RUNTIME=$(date +"%Y%m%d_%H%M.%S.%N")
if [[ -z "${OUTPUT_DIR}" ]]; then
  OUTPUT_DIR=${OUTPUT_DIR_PREFIX}/out/deepseek_v3/bf16_${TRANSFORMER_IMPL}_${EXP_NAME}_nl${NUM_LAYERS}_gb${GLOBAL_BATCH_SIZE}_mb${MICRO_BATCH_SIZE}_sp${SEQ_PARALLEL}_D${DP}_T${TP}_P${PP}_E${EP}_devices${NUM_DEVICES}_${RUNTIME}
fi
CHECKPOINTS_DIR=${CHECKPOINTS_DIR:-${OUTPUT_DIR}/checkpoints}
LOAD_DIR=${LOAD_DIR:-${CHECKPOINTS_DIR}}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${OUTPUT_DIR}/tensorboard}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-${DATA_DIR}}
DATA_PATH=${DATA_DIR}/${DATA_FILE_PREFIX}

# ---------------------------------------------------------------------------------------------------------------
# Notes: Gaudi settings that reach no flag (dsv3 train itself lists the seed's flags that have no effect in dsv3).
NA=()
for v in HL_USE_LAZY_MODE HL_HNIC HL_HCCL_OVER_OFI HL_HCCL_GAUDI_DIRECT HL_FI_PROVIDER HL_TORCHRUN_NODE_RANK \
         HL_TORCHRUN_MASTER_ADDR HL_TORCHRUN_MULTINODE; do
  is_set "$v" && NA+=("$v=${!v}")
done
[[ ${#NA[@]} -gt 0 ]] && note "not applicable on dsv3 (CPU), ignored: ${NA[*]}"
if [[ ${TOKEN_DROP} -ge 2 ]]; then
  note "HL_TOKEN_DROP=${TOKEN_DROP} has no code path in the seed script either (only 1 drops tokens); running dropless"
fi
if [[ -n "${MODEL_CONFIG}" ]]; then
  note "model shape from HL_MODEL_CONFIG=${MODEL_CONFIG}; the script's hard-coded DeepSeek-V3 sizes, init std," \
       "rope base, router groups/top-k/scaling and --max-position-embeddings are not passed (HL_* shape variables" \
       "that are set still override the file)"
fi

# ---------------------------------------------------------------------------------------------------------------
# dsv3 train arguments: the seed's, in its order (its MOE_ARGS and MLA_ARGS in place). add_opt leaves a flag out
# when its value is empty (a shape HL_MODEL_CONFIG decides).
ARGS=()
add() { ARGS+=("$@"); }
add_opt() { [[ -z "$2" ]] || ARGS+=("$1" "$2"); }

[[ -n "${MODEL_CONFIG}" ]] && add --model-config "${MODEL_CONFIG}"
add --transformer-impl "${TRANSFORMER_IMPL}"
add --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
[[ ${FISRT_PP_STAGE_LAYERS} -gt 0 ]] && add --decoder-first-pipeline-num-layers "${FISRT_PP_STAGE_LAYERS}"
[[ ${LAST_PP_STAGE_LAYERS} -gt 0 ]] && add --decoder-last-pipeline-num-layers "${LAST_PP_STAGE_LAYERS}"
add --distributed-backend nccl
add --seq-length "${SEQ_LEN}"
if [[ -z "${MODEL_CONFIG}" ]] || is_set HL_NUM_LAYERS; then add --num-layers "${NUM_LAYERS}"; fi
add_opt --hidden-size "${HIDDEN_SIZE}"
add_opt --num-attention-heads "${NUM_HEADS}"
add --num-query-groups "${NUM_KV_HEADS}"
add_opt --ffn-hidden-size "${FFN_HIDDEN_SIZE}"
add --position-embedding-type rope
add_opt --rotary-base "${ROTARY_BASE}"
[[ -z "${MODEL_CONFIG}" ]] && add --max-position-embeddings "${SEQ_LEN}"
add --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
add --attention-dropout "${DROPOUT}" --hidden-dropout "${DROPOUT}"
# MOE_ARGS
add_opt --num-experts "${NUM_EXPERTS}"
add_opt --moe-router-topk "${TOPK}"
add --expert-model-parallel-size "${EP}"
add --moe-router-load-balancing-type seq_aux_loss --moe-router-bias-update-rate 0.001
add --moe-router-score-function sigmoid
add_opt --moe-router-topk-scaling-factor "${TOPK_SCALING_FACTOR}"
add_opt --moe-router-num-groups "${ROUTER_NUM_GROUPS}"
add_opt --moe-router-group-topk "${ROUTER_GROUP_TOPK}"
add --moe-router-enable-expert-bias
add --moe-aux-loss-coeff "${AUX_LOSS_COEFF}"
add --moe-token-dispatcher-type "${TOKEN_DISPATCHER_TYPE}"
add_opt --moe-ffn-hidden-size "${EXPERT_FFN_HIDDEN_SIZE}"
add_opt --moe-shared-expert-intermediate-size "${SHARED_EXPERT_FFN_HIDDEN_SIZE}"
if [[ "${TOKEN_DISPATCHER_TYPE}" = "alltoall" && ${ENABLE_SHARED_EXPERT_OVERLAP} -eq 1 ]]; then
  add --moe-shared-expert-overlap
fi
if [[ ${TOKEN_DROP} -eq 1 ]]; then
  add --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity --moe-token-drop-policy probs
fi
[[ ${MOE_LAYER_RECOMPUTE} -eq 1 ]] && add --recompute-granularity selective --recompute-modules moe
# The seed's list expression, parentheses included (one word here; the seed relies on word splitting).
if [[ ${MOE_SKIP_FIRST_LAYERS} -gt 0 ]] && { [[ -z "${MODEL_CONFIG}" ]] || is_set HL_MOE_SKIP_FIRST_LAYERS; }; then
  add --moe-layer-freq "([0]*${MOE_SKIP_FIRST_LAYERS}+[1]*$((NUM_LAYERS - MOE_SKIP_FIRST_LAYERS)))"
elif [[ -n "${MODEL_CONFIG}" ]] && is_set HL_MOE_SKIP_FIRST_LAYERS; then
  add --moe-layer-freq 1  # HL_MOE_SKIP_FIRST_LAYERS=0 over a config: every layer MoE, as Megatron's default
fi
# MLA_ARGS
add --multi-latent-attention
add_opt --q-lora-rank "${Q_LORA_RANK}"
add_opt --kv-lora-rank "${KV_LORA_RANK}"
add_opt --qk-head-dim "${QK_HEAD_DIM}"
add --qk-layernorm
add_opt --qk-pos-emb-head-dim "${QK_POS_EMB_HEAD_DIM}"
add_opt --v-head-dim "${V_HEAD_DIM}"
# optimizer, schedule, Gaudi kernels, logging, data
add --weight-decay 1e-1 --clip-grad 1.0 --adam-beta1 "${ADAM_BETA1}" --adam-beta2 "${ADAM_BETA2}"
add --adam-eps "${ADAM_EPS}" --lr "${LR}" --lr-decay-style cosine --lr-warmup-iters "${LR_WARMUP_ITERS}"
add --min-lr "${MIN_LR}"
add --use-fused-sdpa-with-recompute "${USE_FUSED_SDPA_WITH_RECOMPUTE}" --use-fused-sdpa "${USE_FUSED_SDPA}"
add --use-fused-rmsnorm "${USE_FUSED_RMSNORM}" --use-fast-softmax "${USE_FAST_SOFTMAX}"
add --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
add --train-iters "${TRAIN_ITERS}" --lr-decay-iters "${LR_DECAY_ITER}"
add --log-interval "${LOG_INTERVAL}" --log-throughput
add --disable-bias-linear --optimizer "${OPTIMIZER}"
add --no-gradient-accumulation-fusion --no-masked-softmax-fusion --use-mcore-models
add --bf16
add --exit-interval "${EXIT_INTERVAL}"
add --tensorboard-dir "${TENSORBOARD_DIR}" --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard
add --load "${LOAD_DIR}" --use-checkpoint-args
add --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}"
add --data-path "${DATA_PATH}"
add_opt --init-method-std "${INIT_STD}"
add --num-workers "${NUM_WORKERS}"
add --no-rope-fusion
add --kv-channels "${KV_CHANNELS}"
add "--use-torch-compile=${USE_TORCH_COMPILE}" "--use-torch-compiled-autograd=${USE_TORCH_COMPILED_AUTOGRAD}"
add --distributed-timeout-minutes 60
# the seed's optional flags, in its order
[[ ${MOE_GROUPED_GEMM} -eq 1 ]] && add --moe-grouped-gemm
[[ ${ENABLE_PARAM_GATHER_OVERLAP} -eq 1 ]] && add --overlap-param-gather
[[ ${ENABLE_GRAD_REDUCE_OVERLAP} -eq 1 ]] && add --overlap-grad-reduce
[[ ${SEQ_PARALLEL} -eq 1 ]] && add --sequence-parallel
if [[ ${CKP_ACT} -eq 1 ]]; then
  add --recompute-granularity=full --recompute-method uniform --recompute-num-layers "${RECOMPUTE_NUM_LAYERS}"
elif [[ ${CKP_ACT} -eq 2 ]]; then
  add --recompute-granularity selective
fi
if [[ ${USE_DISTRIBUTED_OPTIMIZER} -eq 1 ]]; then
  add --use-distributed-optimizer
  add_opt --save-distrib-optimizer-method "${SAVE_DISTRIB_OPTIMIZER_METHOD}"
  add_opt --load-distrib-optimizer-method "${LOAD_DISTRIB_OPTIMIZER_METHOD}"
fi
[[ ${DETERMINISTIC_MODE} -eq 1 ]] && add --deterministic-mode
[[ -n "${KILL_SWITCH_FILE}" ]] && add --kill-switch-file "${KILL_SWITCH_FILE}"
if [[ -n "${PROFILE_TYPE}" ]]; then
  add --profile-type "${PROFILE_TYPE}" --profile-step-start "${PROFILE_STEP_START}" --profile-step-end "${PROFILE_STEP_END}"
  if [[ -n "${PROFILE_RANKS}" ]]; then
    read -r -a RANKS <<<"${PROFILE_RANKS}"  # the seed passes them word-split
    add --profile-ranks "${RANKS[@]}"
  fi
fi
if [[ ${CHECKPOINT_SAVE} -eq 1 ]]; then
  add --save "${CHECKPOINTS_DIR}" --save-interval "${SAVE_INTERVAL}" --ckpt-format "${CKPT_FORMAT}"
  [[ ${VERIFY_CKPT} -eq 1 ]] && add --verify-checkpoint --verify-checkpoint-model-type DEEPSEEK
fi
add --tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_MODEL}"
[[ -n "${DATA_CACHE_DIR}" ]] && add --data-cache-path "${DATA_CACHE_DIR}"
# Extensions (not in the seed), after its flags: norm epsilon, MTP, split, seed, and free-form extra flags.
is_set HL_NORM_EPS && add --norm-epsilon "${HL_NORM_EPS}"
is_set HL_MTP_NUM_LAYERS && add --mtp-num-layers "${HL_MTP_NUM_LAYERS}"
is_set HL_MTP_LOSS_SCALING_FACTOR && add --mtp-loss-scaling-factor "${HL_MTP_LOSS_SCALING_FACTOR}"
is_set HL_SPLIT && add --split "${HL_SPLIT}"
is_set HL_SEED && add --seed "${HL_SEED}"
if [[ -n "${HL_EXTRA_ARGS:-}" ]]; then
  read -r -a EXTRA <<<"${HL_EXTRA_ARGS}"
  add "${EXTRA[@]}"
fi

# ---------------------------------------------------------------------------------------------------------------
# Launcher.
IFS=',' read -r -a ENV_FLAGS_ARR <<<"${ENV_FLAGS:-}"
CMD=()
MPI_ENV=()  # environment given to mpirun (printed before the command)
HOSTSFILE_LINES=""
if [[ ${NUM_DEVICES} -eq 1 ]]; then
  # One process: run dsv3 directly (it needs no launcher); ENV_FLAGS are exported as for torchrun.
  note "world size 1: running ${DSV3_BIN} directly, without mpirun"
  for f in "${ENV_FLAGS_ARR[@]}"; do [[ -n "$f" ]] && export "${f?}"; done
  CMD=("${DSV3_BIN}" train "${ARGS[@]}")
else
  if [[ "${NUM_NODES}" -ne 1 && -z "${HOSTSFILE}" ]]; then
    etc_mpi_hostfile=/etc/mpi/hostfile
    [[ -f "${etc_mpi_hostfile}" ]] || seed_fail "${etc_mpi_hostfile} not available, set HL_HOSTSFILE"
    # The seed writes examples/hostsfile with slots=8; this writes it into the output directory with
    # slots=HL_DEVICES_PER_NODE (the seed's 8 is its device count per Gaudi node).
    HOSTSFILE=${OUTPUT_DIR}/hostsfile
    HOSTSFILE_LINES=$(sed -e '/^[[:space:]]*$/d' -e "s/\$/ slots=${DEVICES_PER_NODE}/" "${etc_mpi_hostfile}")
  fi
  # Threads per rank: HL_PE cores when binding, else OMP_NUM_THREADS, else this node's cores shared out.
  CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc honours OMP_* otherwise
  if [[ -n "${HL_PE:-}" ]]; then
    OMP_THREADS=${HL_PE}
  elif [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    OMP_THREADS=${OMP_NUM_THREADS}
  else
    OMP_THREADS=$((CORES / DEVICES_PER_NODE))
    [[ ${OMP_THREADS} -ge 1 ]] || OMP_THREADS=1
  fi
  # OMP_NUM_THREADS reaches every rank as one more ENV_FLAGS item (the seed's -x mechanism), unless ENV_FLAGS sets it.
  [[ ",${ENV_FLAGS:-}" == *,OMP_NUM_THREADS=* ]] || ENV_FLAGS_ARR+=("OMP_NUM_THREADS=${OMP_THREADS}")
  # More ranks than cores on one node: OpenMPI refuses unless oversubscription is allowed, here through its MCA
  # environment variable so that the command stays the seed's.
  if [[ "${NUM_NODES}" -eq 1 && ${NUM_DEVICES} -gt ${CORES} ]]; then
    MPI_ENV+=(OMPI_MCA_rmaps_base_oversubscribe=1)
  fi
  # The seed's mpirun command, token for token.
  CMD=(mpirun --allow-run-as-root --mca plm_rsh_args "-p${SSH_PORT}")
  [[ -n "${MPI_ROOT:-}" ]] && CMD+=(--prefix "${MPI_ROOT}")
  CMD+=(-n "${NUM_DEVICES}")
  MAP_BY=""
  [[ -n "${HL_PE:-}" ]] && MAP_BY="socket:PE=${HL_PE}"
  [[ -n "${HL_PE:-}" && -n "${HL_PPR:-}" ]] && MAP_BY="ppr:${HL_PPR}:socket:PE=${HL_PE}"
  if [[ -n "${MAP_BY}" ]]; then
    CMD+=(--bind-to core --rank-by slot --report-bindings --map-by "${MAP_BY}")
  else
    CMD+=(--bind-to none)
  fi
  if [[ "${HNIC}" -eq 1 ]]; then
    export HCCL_OVER_OFI HCCL_GAUDI_DIRECT FI_PROVIDER
    CMD+=(-x HCCL_OVER_OFI -x HCCL_GAUDI_DIRECT -x FI_PROVIDER -x LD_LIBRARY_PATH)
  fi
  CMD+=(-x PT_HPU_GPU_MIGRATION=1 -x "PT_HPU_LAZY_MODE=${USE_LAZY_MODE}")
  for f in "${ENV_FLAGS_ARR[@]}"; do [[ -n "$f" ]] && CMD+=(-x "$f"); done
  if [[ "${NUM_NODES}" -ne 1 ]]; then
    if [[ -n "${HOSTSFILE_LINES}" ]]; then
      MASTER=$(head -n 1 <<<"${HOSTSFILE_LINES}" | awk '{print $1}')
    else
      [[ -f "${HOSTSFILE}" ]] || fail "HL_HOSTSFILE=${HOSTSFILE}: no such file"
      MASTER=$(sed -e '/^[[:space:]]*\(#.*\)\{0,1\}$/d' "${HOSTSFILE}" | head -n 1 | awk '{print $1}')
    fi
    CMD+=(-hostfile "${HOSTSFILE}" -x "MASTER_ADDR=${MASTER}")
  else
    CMD+=(-x MASTER_ADDR=localhost)
  fi
  CMD+=(-x MASTER_PORT=12345)
  CMD+=("${DSV3_BIN}" train "${ARGS[@]}")
fi

# Print the command, quoted so that it can be pasted into a shell.
quote() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

if [[ "${DRY_RUN}" -eq 1 ]]; then
  [[ -n "${HOSTSFILE_LINES}" ]] && note "would write ${HOSTSFILE}: $(tr '\n' ';' <<<"${HOSTSFILE_LINES}")"
  quote "${MPI_ENV[@]}" "${CMD[@]}"
  exit 0
fi

[[ -x "${DSV3_BIN}" ]] || fail "dsv3 binary not found at ${DSV3_BIN}; build it (make build) or set HL_DSV3_BIN"
if [[ ${NUM_DEVICES} -gt 1 ]]; then
  command -v mpirun >/dev/null || fail "mpirun not found; install OpenMPI (apt-get install openmpi-bin)"
  # A dsv3 without the MPI runtime would run NUM_DEVICES independent single-process trainings.
  # (ldd's whole output first: `ldd | grep -q` under pipefail fails whenever grep exits before ldd has written all.)
  DSV3_LIBS=$(ldd "${DSV3_BIN}" 2>/dev/null || true)
  if [[ "${DSV3_LIBS}" != *libmpi* ]]; then
    fail "world size ${NUM_DEVICES} needs dsv3's distributed runtime, and ${DSV3_BIN} is not built with MPI;" \
         "run with one process (HL_NUM_NODES=1 HL_DEVICES_PER_NODE=1 HL_DP=1 HL_TP=1 HL_PP=1 HL_EP=1)," \
         "or HL_DRY_RUN=1 to see the mpirun command"
  fi
fi
mkdir -p "${OUTPUT_DIR}" "${CHECKPOINTS_DIR}" "${TENSORBOARD_DIR}"
[[ -n "${HOSTSFILE_LINES}" ]] && echo "${HOSTSFILE_LINES}" >"${HOSTSFILE}"
echo "+ $(quote "${MPI_ENV[@]}" "${CMD[@]}")" >&2
if [[ "${REDIRECT_LOGS}" -eq 1 ]]; then
  env "${MPI_ENV[@]}" "${CMD[@]}" 2>&1 | tee "${OUTPUT_DIR}/log_${EXP_NAME}_${RUNTIME}.txt"
else
  env "${MPI_ENV[@]}" "${CMD[@]}"
fi
