# GPU worker: vLLM (CUDA) in-process. Needs only REDIS_URL and the model directory; no database credentials.
FROM vllm/vllm-openai:latest
ENV PYTHONUNBUFFERED=1 FARM_MODEL_DIR=/models
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt peft  # peft: LoRA fine-tuning on training workers (`--train gpu-80gb`)
COPY farm farm
COPY gpu_workers gpu_workers
COPY tasks tasks
ENTRYPOINT ["python", "-m", "gpu_workers"]
