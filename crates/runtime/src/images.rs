//! Image builds and container clean-up for the tools beside the daemon (the
//! CLI's `quickstart --docker` builds its module images from local binaries
//! and removes the containers it left): the Docker calls they need live here
//! so that only this crate talks to Docker.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::query_parameters::{
    BuildImageOptions, BuildImageOptionsBuilder, InspectContainerOptions,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt as _;

use crate::RuntimeError;
use crate::docker::{DockerRuntime, general_error, status_of};

/// Size of each chunk of a build context streamed from a file.
const CONTEXT_CHUNK: usize = 1 << 20;

fn build_options(tag: &str) -> BuildImageOptions {
    BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build()
}

/// Follows one build to its end; fails with the builder's own message.
async fn finish_build(
    tag: &str,
    stream: impl futures_util::Stream<Item = Result<bollard::models::BuildInfo, bollard::errors::Error>>,
) -> Result<(), RuntimeError> {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| RuntimeError::Other(format!("building {tag}: {e}")))?;
        if let Some(detail) = info.error_detail.and_then(|d| d.message) {
            return Err(RuntimeError::Other(format!("building {tag}: {detail}")));
        }
    }
    Ok(())
}

impl DockerRuntime {
    /// Builds image `tag` from a tar build context held in memory
    /// (intermediate containers removed, even on failure).
    pub async fn build_image(&self, tag: &str, context: Bytes) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let body = bollard::body_full(context);
        finish_build(
            tag,
            docker.build_image(build_options(tag), None, Some(body)),
        )
        .await
    }

    /// [`build_image`](Self::build_image) from a tar file, streamed in
    /// 1 MiB chunks (a context of whole executables can be hundreds of MB).
    pub async fn build_image_from_file(
        &self,
        tag: &str,
        context: &Path,
    ) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let file = tokio::fs::File::open(context)
            .await
            .map_err(|e| RuntimeError::Other(format!("opening {}: {e}", context.display())))?;
        let chunks = futures_util::stream::unfold(Some(file), |file| async move {
            use tokio::io::AsyncReadExt as _;
            let mut file = file?;
            let mut buf = vec![0u8; CONTEXT_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let body = bollard::body_try_stream(chunks);
        finish_build(
            tag,
            docker.build_image(build_options(tag), None, Some(body)),
        )
        .await
    }

    /// What an image takes on disk, in bytes; `Ok(None)` if there is no
    /// such image.
    pub async fn image_size(&self, reference: &str) -> Result<Option<u64>, RuntimeError> {
        let docker = self.client().await?;
        match docker.inspect_image(reference).await {
            Ok(i) => Ok(Some(
                i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            )),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(general_error(e)),
        }
    }

    /// The labels of the container named `name`, whoever made it
    /// (`Ok(None)` if there is no such container), so a caller can decide
    /// whether it is its own before [`stop_and_remove_container`](Self::stop_and_remove_container).
    pub async fn container_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        let docker = self.client().await?;
        match docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(Some(c.config.and_then(|c| c.labels).unwrap_or_default())),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(general_error(e)),
        }
    }

    /// Stops the container named `name` (SIGTERM, SIGKILL after `grace`)
    /// and removes it with its anonymous volumes, whoever made it: the
    /// caller checks ownership ([`container_labels`](Self::container_labels)).
    /// `Ok(false)` if there was no such container.
    pub async fn stop_and_remove_container(
        &self,
        name: &str,
        grace: Duration,
    ) -> Result<bool, RuntimeError> {
        let docker = self.client().await?;
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        // A stop that fails (already stopped, gone) still leaves the forced
        // removal below to do the job.
        let _ = docker
            .stop_container(
                name,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
            .await;
        match docker
            .remove_container(
                name,
                Some(
                    RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(general_error(e)),
        }
    }
}
