# moa-ray on Ray's own image, for `moa-ray serve k8s --image ...` and the Ray cluster launcher.
#
#   docker build -t registry.example.com/moa-ray:0.1.0 .                              # CPU nodes: remote + embedded models
#   docker build --build-arg VARIANT=gpu -t registry.example.com/moa-ray:0.1.0-gpu .  # GPU pools: vLLM via Ray Serve LLM
#
# RAY_VERSION must be the Ray the manifests declare (moa_ray/serve/manifests.py RAY_VERSION); a test checks it.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu

FROM base-${VARIANT}
ARG VARIANT
WORKDIR /home/ray/moa-ray
COPY --chown=ray:users pyproject.toml README.md requirements.txt ./
COPY --chown=ray:users moa_ray ./moa_ray
COPY --chown=ray:users jobs ./jobs
# The README's install command (moa-ray, llama.cpp built with portable CPU flags), then vLLM on GPU images.
RUN pip install --no-cache-dir -r requirements.txt \
    && if [ "$VARIANT" = "gpu" ]; then pip install --no-cache-dir -e '.[vllm]'; fi
ENV RAY_USAGE_STATS_ENABLED=0
