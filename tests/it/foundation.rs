//! Issue 2: LoginURL, connector selection, health, reflection.

use bitbucket_connector::pb;
use tonic::Code;

use crate::harness::*;

fn login_url_request(callback: &str, state: &str, connector_id: &str) -> pb::LoginUrlRequest {
    pb::LoginUrlRequest {
        scopes: scopes(false, false),
        callback_url: callback.to_string(),
        state: state.to_string(),
        connector_id: connector_id.to_string(),
    }
}

#[tokio::test]
async fn login_url_passes_state_through_percent_encoded() {
    let env = Env::start().await;
    let resp = env
        .client()
        .login_url(login_url_request(REDIRECT, "a b&c=d/é", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.connector_data.is_empty());
    let url = url::Url::parse(&resp.url).unwrap();
    assert_eq!(url.as_str().split('?').next().unwrap(), env.fake.auth_url());
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["state"], "a b&c=d/é");
    assert!(
        !resp.url.contains("a b"),
        "state must be percent-encoded: {}",
        resp.url
    );
}

#[tokio::test]
async fn login_url_rejects_a_callback_that_is_not_the_redirect_uri() {
    let env = Env::start().await;
    let err = env
        .client()
        .login_url(login_url_request(
            "http://127.0.0.1:5556/dex/callback/",
            "s",
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "expected callback URL \"http://127.0.0.1:5556/dex/callback/\" did not match the URL in the config \"http://127.0.0.1:5556/dex/callback\""
    );
    assert_eq!(reason(&err), "CALLBACK_URL_MISMATCH");
    env.assert_serving().await;
}

#[tokio::test]
async fn connector_id_selects_and_unknown_or_ambiguous_is_not_found() {
    let env = Setup {
        second_connector: true,
        ..Setup::default()
    }
    .start()
    .await;
    let mut c = env.client();
    for id in ["bitbucket-cloud", "second"] {
        c.login_url(login_url_request(REDIRECT, "s", id))
            .await
            .unwrap();
    }
    let err = c
        .login_url(login_url_request(REDIRECT, "s", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "AMBIGUOUS_CONNECTOR");
    let err = c
        .login_url(login_url_request(REDIRECT, "s", "github"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "UNKNOWN_CONNECTOR");
    assert!(err.message().contains("\"github\""), "{}", err.message());
}

#[tokio::test]
async fn health_is_serving_for_both_service_names() {
    let env = Env::start().await;
    assert_eq!(env.health_status("").await.unwrap(), 1);
    assert_eq!(
        env.health_status("connector.v1.ConnectorService")
            .await
            .unwrap(),
        1
    );
    let err = env.health_status("no.such.Service").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_v1alpha_and_v1_list_the_services() {
    use tokio_stream::StreamExt as _;
    let env = Env::start().await;

    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::{
        server_reflection_request::MessageRequest as AlphaReq,
        server_reflection_response::MessageResponse as AlphaResp,
        ServerReflectionRequest as AlphaRequest,
    };
    let mut alpha = AlphaClient::new(env.channel.clone());
    let req = AlphaRequest {
        host: String::new(),
        message_request: Some(AlphaReq::ListServices(String::new())),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(resp)) = stream.next().await else {
        panic!("no reflection answer")
    };
    let Some(AlphaResp::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["connector.v1.ConnectorService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut v1 = ServerReflectionClient::new(env.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "connector.v1.ConnectorService".into(),
        )),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(resp)) = stream.next().await else {
        panic!("no reflection answer")
    };
    let Some(MessageResponse::FileDescriptorResponse(fds)) = resp.message_response else {
        panic!("{resp:?}")
    };
    assert!(!fds.file_descriptor_proto.is_empty());
}
