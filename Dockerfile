FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=0.1.0
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=${VERSION}" -o /imagepipe ./cmd/imagepipe

FROM debian:bookworm-slim
# qemu-utils: qemu-img; util-linux: prlimit, which caps qemu-img's memory.
# No curl: health checks run `imagepipe healthcheck`.
RUN apt-get update && apt-get install -y --no-install-recommends qemu-utils util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /imagepipe /usr/local/bin/imagepipe
# A fresh volume mounted on /scratch takes this owner, so convert can write.
RUN mkdir -p /scratch && chown 65532:65532 /scratch && chmod 0700 /scratch
ENV IMAGEPIPE_SCRATCH_DIR=/scratch
USER 65532:65532
ENTRYPOINT ["imagepipe"]
