# The connprobe image: Debian bookworm, bcc (python3-bpfcc), the Debian kernel headers bcc compiles against,
# and connprobe in a virtual environment on Debian's python3 with bcc exposed to it (as scripts/setup does).
# The entrypoint links those headers for the node's kernel when the node has none, and mounts tracefs when it
# can: the DaemonSet needs no host /lib/modules or /usr/src (README "The image").
# Where no registry is reachable, scripts/build-image builds the same image from Debian packages.
#   docker build -t connprobe:0.1.0 .
FROM debian:bookworm-slim

# Same package list as scripts/build-image; no recommends, no documentation.
COPY deploy/image/packages /tmp/packages
RUN printf 'path-exclude=/usr/share/%s/*\n' man info locale doc > /etc/dpkg/dpkg.cfg.d/connprobe-nodoc \
 && echo 'path-include=/usr/share/doc/*/copyright' >> /etc/dpkg/dpkg.cfg.d/connprobe-nodoc \
 && apt-get update -q \
 && sed 's/#.*//' /tmp/packages | xargs apt-get install -y -q --no-install-recommends \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/packages

COPY pyproject.toml README.md /tmp/src/
COPY connprobe /tmp/src/connprobe
COPY prober /tmp/src/prober
COPY correlator /tmp/src/correlator
COPY bpf /tmp/src/bpf
COPY deploy/image/install-in-image /tmp/install-in-image
RUN /tmp/install-in-image "/tmp/src[fast]" && rm -rf /tmp/src /tmp/install-in-image

COPY deploy/image/entrypoint /usr/local/bin/connprobe-entrypoint
ENV PATH=/opt/connprobe/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title=connprobe org.opencontainers.image.version=0.1.0
ENTRYPOINT ["/usr/local/bin/connprobe-entrypoint"]
CMD ["doctor"]
