package connector

import (
	"fmt"

	dexconnector "github.com/dexidp/dex/connector"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the ErrorInfo domain of the service's errors.
const ErrorDomain = "bitbucket-connector"

// ServiceError is an error the service answered: its gRPC code, the ErrorInfo
// reason (a stable SCREAMING_SNAKE name such as UPSTREAM_UNAVAILABLE) and the
// service's message. A service that could not be reached is a ServiceError
// with code Unavailable and no reason.
type ServiceError struct {
	Method   string
	Code     codes.Code
	Reason   string
	Message  string
	Metadata map[string]string
}

func (e *ServiceError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("bitbucket-connector: %s: %s: %s", e.Method, e.Code, e.Message)
	}
	return fmt.Sprintf("bitbucket-connector: %s: %s (%s): %s", e.Method, e.Code, e.Reason, e.Message)
}

// fromRPC is the one mapping from the service's statuses to dex errors:
// not being in the required teams is dex's UserNotInRequiredGroupsError (dex
// answers 403); everything else is a *ServiceError.
func fromRPC(method string, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("bitbucket-connector: %s: %w", method, err)
	}
	se := &ServiceError{Method: method, Code: st.Code(), Message: st.Message()}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			se.Reason = info.GetReason()
			se.Metadata = info.GetMetadata()
			break
		}
	}
	if se.Code == codes.PermissionDenied && se.Reason == "NOT_IN_REQUIRED_TEAMS" {
		return &notInTeams{
			ServiceError: se,
			groups:       &dexconnector.UserNotInRequiredGroupsError{UserID: se.Metadata["username"]},
		}
	}
	return se
}

// unreachable is an UNAVAILABLE that the service did not send: the service's
// own errors carry an ErrorInfo.
func unreachable(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Unavailable && len(st.Details()) == 0
}

// notInTeams keeps the service's message and code and is, for errors.As,
// dex's UserNotInRequiredGroupsError.
type notInTeams struct {
	*ServiceError
	groups *dexconnector.UserNotInRequiredGroupsError
}

func (e *notInTeams) Unwrap() []error { return []error{e.ServiceError, e.groups} }
