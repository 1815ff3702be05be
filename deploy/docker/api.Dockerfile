# Control plane image: API (uvicorn), control worker + beat, Flower, migrations. No engine, no torch.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DJANGO_SETTINGS_MODULE=settings.django FARM_ENV=production
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY manage.py ./
COPY api api
COPY farm farm
COPY settings settings
COPY tasks tasks
COPY deploy/models deploy/models
COPY deploy/k8s/models.yaml deploy/k8s/models.yaml
RUN useradd --uid 10001 farm
USER farm
EXPOSE 8000
CMD ["python", "-m", "uvicorn", "api.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "4", \
     "--no-access-log", "--loop", "uvloop", "--http", "httptools", "--timeout-keep-alive", "75"]
