# inferq in one image: the gateway, the scaler and the replicas the scaler starts
# (`inferq worker`, child processes of the scaler inside its container); on Kubernetes, the
# gateway, the controller and each API's replicas, one pod each (`inferq export kubernetes`).
# Built by docker-compose.gpu.yml; see the README, "GPU hosts with docker compose" and
# "Kubernetes".
#
# GPUs come from the NVIDIA Container Toolkit on the host (driver and NVML are mounted in);
# the image ships no CUDA toolkit: frameworks bring their CUDA libraries with their wheels.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The dependencies first, from pyproject.toml alone, so that a change to the code does not
# reinstall them.
COPY pyproject.toml /tmp/inferq-src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/inferq-src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['onnx']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# A project's requirements.txt needs no rebuild: replicas install it at run time (uv, into
# the INFERQ_HOME volume, once per host). Large frameworks can still be baked in, as pip
# arguments; a requirements.txt that the image then satisfies installs nothing:
#   docker compose -f docker-compose.gpu.yml build --build-arg EXTRA_PIP_PACKAGES="torch==2.3.1"
ARG EXTRA_PIP_PACKAGES=""
RUN if [ -n "$EXTRA_PIP_PACKAGES" ]; then pip install $EXTRA_PIP_PACKAGES; fi

COPY . /tmp/inferq-src
RUN pip install "/tmp/inferq-src[onnx]" && rm -rf /tmp/inferq-src

# A non-root user; INFERQ_HOME (model, bundle and requirements caches) is a volume in compose,
# created here so that a new named volume starts out owned by that user.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin inferq \
    && mkdir -p /var/lib/inferq \
    && chown inferq:inferq /var/lib/inferq
ENV INFERQ_HOME=/var/lib/inferq
# By number, not name: Kubernetes' runAsNonRoot can only check a numeric user
# (`inferq export kubernetes` runs the pods as 10001).
USER 10001:10001
WORKDIR /home/inferq

EXPOSE 8888

# Healthy while the broker answers (gateway and scaler alike; compose gives the gateway a
# check of its own /healthz).
HEALTHCHECK --interval=15s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, redis; redis.Redis.from_url(os.environ['INFERQ_BROKER_URL'], socket_timeout=5, socket_connect_timeout=5).ping()"]

ENTRYPOINT ["inferq"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8888"]
