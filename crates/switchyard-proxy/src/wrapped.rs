//! The stream traits Pingora asks of every connection, forwarded unchanged to the stream a
//! wrapper holds in its `inner` field: what [`crate::ClientStream`] and the HTTP/2 stream
//! wrapper change is how they read, not how they write or what they report.

/// Implements `AsyncWrite`, `Shutdown`, `UniqueID`, `Ssl` and the digest traits for `$type`
/// by forwarding to `self.inner` (a Pingora `Stream`).
macro_rules! forward_to_inner {
    ($type:ty) => {
        impl tokio::io::AsyncWrite for $type {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
            }
        }

        #[async_trait::async_trait]
        impl pingora_core::protocols::Shutdown for $type {
            async fn shutdown(&mut self) {
                self.inner.shutdown().await;
            }
        }

        impl pingora_core::protocols::UniqueID for $type {
            fn id(&self) -> pingora_core::protocols::UniqueIDType {
                self.inner.id()
            }
        }

        impl pingora_core::protocols::Ssl for $type {
            fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
                self.inner.get_ssl()
            }

            fn get_ssl_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora_core::protocols::tls::SslDigest>> {
                self.inner.get_ssl_digest()
            }

            fn selected_alpn_proto(&self) -> Option<pingora_core::protocols::ALPN> {
                self.inner.selected_alpn_proto()
            }
        }

        impl pingora_core::protocols::GetTimingDigest for $type {
            fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
                self.inner.get_timing_digest()
            }

            fn get_read_pending_time(&self) -> std::time::Duration {
                self.inner.get_read_pending_time()
            }

            fn get_write_pending_time(&self) -> std::time::Duration {
                self.inner.get_write_pending_time()
            }
        }

        impl pingora_core::protocols::GetProxyDigest for $type {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
                self.inner.get_proxy_digest()
            }

            fn set_proxy_digest(
                &mut self,
                digest: pingora_core::protocols::raw_connect::ProxyDigest,
            ) {
                self.inner.set_proxy_digest(digest);
            }
        }

        impl pingora_core::protocols::GetSocketDigest for $type {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora_core::protocols::SocketDigest>> {
                self.inner.get_socket_digest()
            }

            fn set_socket_digest(&mut self, digest: pingora_core::protocols::SocketDigest) {
                self.inner.set_socket_digest(digest);
            }
        }
    };
}

pub(crate) use forward_to_inner;
