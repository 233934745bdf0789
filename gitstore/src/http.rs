//! Serving a router over HTTP/1.1 with the deadlines `axum::serve` lacks, for gitstore and the
//! agent alike: a client gets [`Timeouts::headers`] to send a request's headers, and a request
//! body must keep coming at [`Timeouts::body_min_rate`] bytes a second once its first
//! [`Timeouts::body_grace`] is over (the rule of Apache's mod_reqtimeout). Without them a few
//! hundred connections that send a byte a second hold sockets, tasks and, for a push, the
//! project's push lock for as long as they like.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From a connection's (or a kept-alive connection's next) first byte to its request's
    /// last header.
    pub headers: Duration,
    /// What a request body may take before the rate applies...
    pub body_grace: Duration,
    /// ...and the bytes a second it must average from then on (each byte buys
    /// `1 / body_min_rate` s more).
    pub body_min_rate: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            headers: Duration::from_secs(20),
            body_grace: Duration::from_secs(20),
            body_min_rate: 500,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits for the
/// connections in flight (the caller bounds that wait).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, a connection reset before accept: the listener is fine.
                Err(e) => {
                    log::warn!(error:% = e; "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let req = req.map(|body| axum::body::Body::new(MinRate::new(body, timeouts)));
                app.clone().oneshot(req)
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.headers)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that went away or broke the protocol: nothing to do about it here.
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A request body that fails once it falls behind the minimum rate.
struct MinRate<B> {
    inner: B,
    timeouts: Timeouts,
    started: Instant,
    received: u64,
    timer: Pin<Box<Sleep>>,
}

impl<B> MinRate<B> {
    fn new(inner: B, timeouts: Timeouts) -> Self {
        let started = Instant::now();
        Self {
            inner,
            timeouts,
            started,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(started + timeouts.body_grace)),
        }
    }

    fn deadline(&self) -> Instant {
        let rate = self.timeouts.body_min_rate.max(1);
        self.started
            + self.timeouts.body_grace
            + Duration::from_secs_f64(self.received as f64 / rate as f64)
    }
}

impl<B> Body for MinRate<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let deadline = this.deadline();
                    this.timer.as_mut().reset(deadline);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request body came too slowly: {} bytes in {:.0?}; after the first {:?} it \
                 must average {} bytes a second",
                this.received,
                this.started.elapsed(),
                this.timeouts.body_grace,
                this.timeouts.body_min_rate
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
