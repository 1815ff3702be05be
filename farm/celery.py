"""The control plane's Celery app (`celery -A farm.celery worker -Q control`), Django-enabled."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")

from farm.celery_app import create_celery_app
from settings import env

app = create_celery_app(broker_url=env.REDIS_URL, main="farm-control", reap_every_s=env.FARM_REAP_EVERY_S)
app.conf.include = ["tasks.control"]
