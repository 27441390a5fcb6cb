# Thin wrapper: the real build is CMake. `make test` is what CI runs.
BUILD ?= build
JOBS ?= $(shell nproc)
.PHONY: setup build test demo bench bench-preprocess bench-step bench-alltoall bench-parallel bench-gpu clean format format-check \
        check-interop fuzz

setup:
	bash scripts/setup.sh

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

test: setup build
	# One OpenMP thread per test process: ctest already runs JOBS tests at once, and spinning OpenMP teams on
	# shared cores slow down by orders of magnitude.
	# The last line counts passed, failed and skipped tests (from ctest's JUnit file); the exit status is ctest's.
	# The CUDA tests (label `cuda`) run where `dsv3 device-info` sees a GPU, the two transformers/TensorBoard
	# reader tests where python3 imports those packages; elsewhere the last lines say what did not run and why.
	cd $(BUILD) && rm -f ctest-junit.xml && \
	  { gpu=$$(./dsv3 device-info | sed -n 's/^cuda: //p'); sel=""; excl=""; \
	    case "$$gpu" in available*) ;; *) sel="-LE cuda";; esac; \
	    if ! $${DSV3_PYTHON:-python3} -c 'import torch, transformers, tensorboard' >/dev/null 2>&1; then \
	      excl="CheckpointHf.TransformersLoadsTheIterationDirectory|TensorBoard.TensorBoardPackageReadsOurFile"; fi; \
	    OMP_NUM_THREADS=1 ctest --output-on-failure -j $(JOBS) $$sel $${excl:+-E "$$excl"} \
	      --output-junit ctest-junit.xml; rc=$$?; \
	    bash $(CURDIR)/scripts/test-summary.sh ctest-junit.xml; \
	    if [ -n "$$sel" ]; then echo "CUDA tests: not run ($$gpu)"; fi; \
	    if [ -n "$$excl" ]; then echo "Python interop tests: not run (torch, transformers, tensorboard not importable;" \
	      "make check-interop runs them against transformers 4.57 and 5.25)"; fi; exit $$rc; }

demo: setup build
	bash scripts/demo.sh

bench: bench-preprocess bench-step bench-alltoall bench-parallel

bench-preprocess: setup build
	bash bench/preprocess/run.sh

# One training step (bf16 and fp32) against PyTorch eager on the same config; the last line is the summary.
bench-step: setup build
	BUILD=$(BUILD) bash bench/step.sh

# Comm::alltoallv against a plain MPI_Alltoallv on MoE-dispatch-shaped messages, 2 and 4 ranks.
bench-alltoall: setup build
	BUILD=$(BUILD) bash bench/alltoall.sh

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

format-check:
	bash scripts/check-format.sh

# 1/2/4-rank data- and expert-parallel steps split into compute, dispatch/combine, gradient sync and optimizer.
bench-parallel: setup build
	BUILD=$(BUILD) bash bench/parallel_step.sh

# GPU proxies (one H200): PyTorch eager/compile beside dsv3, TFLOP/s and MFU against the measured cuBLASLt roofline.
bench-gpu: setup build
	BUILD=$(BUILD) bash bench/gpu.sh

# The tests that check our files with transformers and TensorBoard, against each pinned transformers version
# (virtual environments under $(BUILD), reused); prints the versions tested and a PASS/FAIL line per test.
check-interop: build
	BUILD=$(BUILD) bash scripts/check-interop.sh

# libFuzzer targets for every reader of outside input (fuzz/README.md): clang + ASan/UBSan in build-fuzz, each
# target FUZZ_SECONDS (default 60) from the committed seeds in fuzz/corpus/. Needs clang; `make test` does not.
fuzz:
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) bash scripts/fuzz.sh

clean:
	rm -rf $(BUILD)
