#!/usr/bin/env bash
# GPU measurements for benchmarks/RESULTS.md, in priority order, within a time budget.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh          # from the repository root
#
# What it measures (each configuration in a fresh process, real steps, memory_stats), in
# priority order; SECTIONS="stage2 stage2_f32" (say) runs only the sections named:
#   1. monai_vs_ours: stage 1, configs/monai_3d_ldm.py at 96x96x64 (--vs-monai)
#   2. stage2:      the diffusion UNet (python -m benchmarks.bench_diffusion) on
#                   configs/diffusion/monai_3d_ldm.py and balanced latents, bf16, vs MONAI:
#                   training step and a 50-step DDIM sampling
#   3. remat:       none / res_blocks / levels for configs/balanced.py and aggressive.py
#   4. stage2_f32:  as 2., float32 on both sides
#   5. seed_table:  A-D at 256x256x64 + aggressive 512x512x128, both decoder heads
#                   (balanced = seed B subpixel and aggressive = its subpixel row, from 3.)
#   6. native_1024: if time is left: 1024x1024x128, aggressive model, subpixel head
# It needs no network: it uses the python found (PY=..., default python3) and whatever
# jax / flax / optax / ml_collections / torch / monai it can import (PYTHONPATH may add a
# folder of pure-Python packages carried along). Missing packages are reported, and the
# sections that need them are skipped.
#
# Budget: BUDGET_S (default 330) seconds in all; a section starts only if enough is left,
# and every configuration is killed after ROW_TIMEOUT_S (default 100). JSON rows are
# written after every configuration, so a cut run keeps what it measured.

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-330}"
SECTIONS="${SECTIONS:-monai_vs_ours stage2 remat stage2_f32 seed_table native_1024}"
ROW_TIMEOUT_S="${ROW_TIMEOUT_S:-100}"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # memory_stats peaks are per process anyway
export TF_CPP_MIN_LOG_LEVEL=2
LOG="$OUT/gpu_run.log"

say() { echo "[gpu_run $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

say "python: $($PY --version 2>&1) at $(command -v $PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# --- What is installed? (one process; its verdicts go to $OUT/env.sh) ----------------------
OUT="$OUT" $PY - <<'EOF' 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
import importlib, os
ok = {}
for name in ["jax", "jaxlib", "flax", "optax", "ml_collections", "orbax.checkpoint", "grain",
             "absl", "numpy", "PIL", "torch", "monai"]:
    try:
        m = importlib.import_module(name)
        ok[name] = True
        print(f"ok      {name} {getattr(m, '__version__', '')}")
    except Exception as e:
        ok[name] = False
        print(f"MISSING {name}: {type(e).__name__}: {e}")
backend, train_ok, cuda = "none", 0, 0
try:
    import jax
    backend = jax.default_backend()
    print("jax devices:", jax.devices())
except Exception as e:
    print("MISSING jax backend:", e)
try:  # ldm_jax.trainer (the step measured) pulls in flax, optax, orbax, grain, absl, PIL
    import benchmarks.bench, ldm_jax.trainer  # noqa: F401
    train_ok = 1
except Exception as e:
    print(f"MISSING for ldm_jax.trainer: {type(e).__name__}: {e}")
if ok.get("torch"):
    import torch
    cuda = int(torch.cuda.is_available())
    print("torch cuda:", bool(cuda), torch.cuda.get_device_name(0) if cuda else "")
with open(os.path.join(os.environ["OUT"], "env.sh"), "w") as f:
    f.write(f"JAX_BACKEND={backend}\nTRAIN_OK={train_ok}\n"
            f"HAVE_MONAI={int(bool(cuda and ok.get('monai')))}\n")
EOF
JAX_BACKEND=none; TRAIN_OK=0; HAVE_MONAI=0
[ -f "$OUT/env.sh" ] && . "$OUT/env.sh"
if [ "$TRAIN_OK" != 1 ]; then
    say "FATAL: cannot import ldm_jax.trainer (missing package above; see env.txt)."
    say "Carry a folder of the missing pure-Python packages and set PYTHONPATH to it."
    exit 2
fi
if [ "$JAX_BACKEND" != gpu ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
    say "WARNING: JAX sees no GPU (backend $JAX_BACKEND)."
    say "The numbers would be CPU numbers; stopping (ALLOW_CPU=1 runs anyway)."
    exit 3
fi

want() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

bench() {  # bench NAME MIN_SECONDS_LEFT ARGS...  (stage 1: benchmarks.bench)
    bench_with benchmarks.bench "$@"
}

bench_with() {  # bench_with MODULE NAME MIN_SECONDS_LEFT ARGS...
    local module="$1" name="$2" need="$3"; shift 3
    want "$name" || { say "SKIP $name: not in SECTIONS"; return; }
    if [ "$(left)" -lt "$need" ]; then
        say "SKIP $name: $(left) s left, it needs about $need s"
        return
    fi
    say "START $name: $*"
    timeout $(( $(left) > 10 ? $(left) : 10 )) \
        $PY -m "$module" "$@" --row-timeout "$ROW_TIMEOUT_S" --json "$OUT/$name.json" \
        > "$OUT/$name.md" 2>> "$LOG"
    say "END $name (exit $?)"
    cat "$OUT/$name.md" | tee -a "$LOG"
}

# --- 1. MONAI vs ours, same GPU, bf16 (autocast on the MONAI side). -----------------------
if [ "$HAVE_MONAI" = 1 ]; then
    bench monai_vs_ours 60 --config configs/monai_3d_ldm.py --vs-monai --steps 5 --warmup 2
elif want monai_vs_ours; then
    say "SKIP monai_vs_ours: torch with CUDA and monai are needed"
fi

# --- 2. and 4. Stage 2: the tutorial UNet on both configs' latents, training step and a
#        50-step DDIM sampling; a fresh process per config and side (estimated ~1 min per
#        config with MONAI: compiling the step and the sampler dominates). ------------------
VS_MONAI=""
[ "$HAVE_MONAI" = 1 ] && VS_MONAI="--vs-monai"
stage2() {  # stage2 NAME DTYPE
    bench_with benchmarks.bench_diffusion "$1" 120 --config configs/diffusion/monai_3d_ldm.py \
        --config configs/diffusion/balanced.py --dtype "$2" $VS_MONAI --steps 5 --warmup 2 \
        --sample-steps 50
}
stage2 stage2 bfloat16

# --- 3. Gradient checkpointing: only a GPU shows what it saves. --------------------------
bench remat 90 --config configs/balanced.py --config configs/aggressive.py \
    --remat none,res_blocks,levels --steps 3

stage2 stage2_f32 float32

# --- 5. The seed table with real steps (its "B subpixel" is balanced remat=none and
#        "aggressive subpixel" is aggressive remat=none, measured above). ----------------
bench seed_table 90 --table seed --steps 3 --only "A,B nearest_conv,C,D,aggressive nearest_conv" \
    --plot "$OUT/seed_memory_gpu.png"

# --- 6. Native microtubule resolution on one GPU. ----------------------------------------
bench native_1024 60 --config configs/aggressive.py --volume 1024,1024,128 \
    --head subpixel --steps 3

say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
