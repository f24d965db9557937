"""Settings of the test project: django-celery-results' admin on PostgreSQL."""

from __future__ import annotations

import os

SECRET_KEY = "tests-only"
DEBUG = os.environ.get("CIT_DJANGO_DEBUG") == "1"  # the screenshot script serves static files
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.integration.django_project.urls"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "cancellable.django",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("CIT_DJANGO_DB", "cancellable_test"),
        "USER": os.environ.get("CIT_DJANGO_DB_USER", "postgres"),
        "HOST": os.environ.get("CIT_DJANGO_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("CIT_DJANGO_DB_PORT", "5432"),
    }
}
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
CANCELLABLE_CELERY_APP = "tests.integration.django_project.celery_app.app"
CANCELLABLE_ADMIN_WAIT = 10.0
